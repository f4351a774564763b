"""Text in and out: the byte-level BPE tokenizer, the sandboxed chat-template renderer, and the tokenizer rebuilt
from a GGUF file's vocabulary."""
