"""The MiMo-Audio model: language model (``agent.lm``), audio tokenizer (``agent.codec``),
checkpoints and the batched engine. PyTorch and numpy only: no asyncio, no sockets."""
