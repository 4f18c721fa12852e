"""Pure-torch model math for block servers: decoder layers, positional encodings, block spans and their KV cache.

Adding a model family: name its tensors in ``swarm/families.py`` (and read its config in ``swarm/config.py``),
write its decoder layer as a module here, and register it in ``BLOCK_CLASSES`` below.
"""

from server.model.attention import KVSlot
from server.model.bloom import BloomBlock
from server.model.falcon import FalconBlock
from server.model.gemma2 import Gemma2Block
from server.model.llama import LlamaBlock
from server.model.mixtral import MixtralBlock
from server.model.qwen3 import Qwen3Block
from server.model.span import BLOCK_CLASSES, BlockSpan, SpanCache

BLOCK_CLASSES.update(
    llama=LlamaBlock,
    mistral=LlamaBlock,
    qwen2=LlamaBlock,
    qwen3=Qwen3Block,
    gemma2=Gemma2Block,
    mixtral=MixtralBlock,
    falcon=FalconBlock,
    bloom=BloomBlock,
)

__all__ = ["BLOCK_CLASSES", "BlockSpan", "KVSlot", "LlamaBlock", "SpanCache"]
