"""Flax (linen) stacks (MLP, conv, recurrent, Transformer), layers, and the any-model layer chain."""

from gradflow.nn.chains import Chain as Chain
from gradflow.nn.chains import Segment as Segment
from gradflow.nn.chains import chain as chain
from gradflow.nn.chains import cut as cut
from gradflow.nn.chains import layer_map as layer_map
from gradflow.nn.chains import layer_variables as layer_variables
from gradflow.nn.chains import provides_chain as provides_chain
from gradflow.nn.chains import with_layer_variables as with_layer_variables
from gradflow.nn.config import KINDS as KINDS
from gradflow.nn.config import StackConfig as StackConfig
from gradflow.nn.conv import PADDINGS as PADDINGS
from gradflow.nn.conv import ConvStack as ConvStack
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
from gradflow.nn.transformer import LN_PLACEMENTS as LN_PLACEMENTS
from gradflow.nn.transformer import TransformerBlock as TransformerBlock
from gradflow.nn.transformer import TransformerStack as TransformerStack

__all__ = [
    "Chain",
    "Segment",
    "chain",
    "cut",
    "layer_map",
    "layer_variables",
    "provides_chain",
    "with_layer_variables",
    "KINDS",
    "StackConfig",
    "PADDINGS",
    "ConvStack",
    "Maxout",
    "PReLU",
    "RReLU",
    "NORMS",
    "RESIDUALS",
    "Block",
    "MLPStack",
    "GRUStack",
    "LSTMStack",
    "RNNStack",
    "LN_PLACEMENTS",
    "TransformerBlock",
    "TransformerStack",
]
