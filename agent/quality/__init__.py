"""Quality of the built-in model's answers: an independent recognizer and ``mimo-agent bench-quality``."""
