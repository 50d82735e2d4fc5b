"""The ACPI fixed-hardware registers vmscope's FADT points at: the PM1a event and control blocks
and the PM timer (I/O ports), their bits, and the SCI line.

Shared by the table builder (:mod:`vmscope.arch.x86.acpi`) and the device that implements them
(:mod:`vmscope.devices.acpi_pm`); a module of its own so the device does not import the builder.
"""

from __future__ import annotations

PM1A_EVT_PORT = 0x600
PM1A_EVT_LENGTH = 4
PM1A_CNT_PORT = 0x604
PM1A_CNT_LENGTH = 2
PM_TMR_PORT = 0x608
PM_TMR_LENGTH = 4
SCI_IRQ = 9

#: PM1 control register bits the power-off device decodes
PM1_CNT_SCI_EN = 1 << 0
PM1_CNT_SLP_TYP_SHIFT = 10
PM1_CNT_SLP_TYP_MASK = 0x7 << PM1_CNT_SLP_TYP_SHIFT
PM1_CNT_SLP_EN = 1 << 13
#: SLP_TYPa/b the DSDT's \_S5 object gives for soft-off
S5_SLEEP_TYPE = 5
