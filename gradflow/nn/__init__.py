"""Flax (linen) stacks and layers; every stack exposes the layer-walking interface (`walk`)."""

from gradflow.nn.config import KINDS as KINDS
from gradflow.nn.config import StackConfig as StackConfig
from gradflow.nn.layers import Maxout as Maxout
from gradflow.nn.layers import PReLU as PReLU
from gradflow.nn.layers import RReLU as RReLU
from gradflow.nn.mlp import NORMS as NORMS
from gradflow.nn.mlp import RESIDUALS as RESIDUALS
from gradflow.nn.mlp import Block as Block
from gradflow.nn.mlp import MLPStack as MLPStack
from gradflow.nn.recurrent import GRUStack as GRUStack
from gradflow.nn.recurrent import LSTMStack as LSTMStack
from gradflow.nn.recurrent import RNNStack as RNNStack
from gradflow.nn.walk import LayerWalk as LayerWalk
from gradflow.nn.walk import Walkable as Walkable
