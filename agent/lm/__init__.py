"""The MiMo-Audio speech language model (spec sections 2 and 3).

Functional API for the batched engine (``agent.lm.model``)::

    lm = MiMoAudioLM(config)                                  # or load_lm(...) / build_preset(...)
    cache = KVCache.allocate(config, num_slots, max_positions, device, dtype)
    emb = lm.embed_patches(text_ids, codes)                   # [B, P], [B, P, 4, 8] -> [B, P, hidden]
    h = lm.prefill(cache, slot, emb)                          # [1, P, hidden] -> [1, hidden]
    h = lm.decode_step(cache, slots, emb)                     # [B, 1, hidden] -> [B, hidden]
    logits = lm.text_logits(h)                                # [B, vocab] fp32
    codes = lm.decode_patch(h, speech_sampling, generators)   # [B, hidden] -> [B, 4, 8]

Components, one per file: ``config`` (official config.json, presets), ``transformer`` (Qwen2
blocks), ``patch_encoder``, ``model`` (weights, backbone), ``patch_decoder``, ``kv_cache``,
``sampling``, ``generation`` (controls), ``tokenizer``, ``prompts``, ``session`` (streaming
batch-1 generation), ``bench``. Checkpoint I/O is ``agent.checkpoint.load_lm``/``save_lm``.
Import the submodules directly; this package imports nothing at load time.
"""
