"""Export a trained VLM to formats other tools load (Hugging Face LLaVA)."""
