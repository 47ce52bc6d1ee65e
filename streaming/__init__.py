"""Real-time serving: OpenAI Realtime protocol, transports, the HTTP app, the client SDK and the
latency benchmark. Importing this package (and the client SDK) must not import torch."""
