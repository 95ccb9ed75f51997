"""An OpenAI-compatible gateway for a hybrid fleet of local, remote and cloud LLM backends."""
