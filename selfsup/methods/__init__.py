"""Method registry: name -> Method subclass."""
from .instdisc import InstDisc
from .moco import MoCo
from .pic import PIC
from .simclr import SimCLR

METHODS = {"simclr": SimCLR, "moco": MoCo, "instdisc": InstDisc, "pic": PIC}
