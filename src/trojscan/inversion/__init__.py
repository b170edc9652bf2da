"""Trigger inverters, each a registered :class:`~trojscan.inversion.base.Inverter`.

Importing this package registers every method; a new method is one module here, imported
below. The import order is the order ``--method`` lists the methods in.
"""

# ruff: noqa: I001, F401
from trojscan.inversion import dbs
from trojscan.inversion import uat
from trojscan.inversion import gcg
from trojscan.inversion import ascc
from trojscan.inversion import genetic
from trojscan.inversion import tminer
from trojscan.inversion import tijo
