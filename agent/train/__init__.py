"""Training of the built-in tiny models from speech synthesised by voices installable here.

``voices`` (espeak-ng, flite, festival through their command lines, sox for augmentation),
``lexicon`` (a seeded sentence generator over a closed vocabulary), ``data`` (the corpus and its
manifest), ``codec`` (the tokenizer's training loop) and ``evaluate`` (STOI and log-mel L1).
"""
