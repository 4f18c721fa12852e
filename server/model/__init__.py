"""Pure-torch model math for block servers: decoder layers, rotary tables, block spans and their KV cache.

Adding a model family: write its decoder layer as a module here and register it in ``BLOCK_CLASSES`` below.
"""

from server.model.llama import KVSlot, LlamaBlock
from server.model.span import BLOCK_CLASSES, BlockSpan, SpanCache

BLOCK_CLASSES.update(llama=LlamaBlock, mistral=LlamaBlock, qwen2=LlamaBlock)

__all__ = ["BLOCK_CLASSES", "BlockSpan", "KVSlot", "LlamaBlock", "SpanCache"]
