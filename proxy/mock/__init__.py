"""The mock upstream (`embedding-proxy mock-upstream`): a deterministic OpenAI-shaped server and its faults."""
