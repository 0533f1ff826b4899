"""Method registry: name -> Method subclass."""
from .simclr import SimCLR

METHODS = {"simclr": SimCLR}
