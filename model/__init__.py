"""Llama 3 architecture, flavors, parameter/FLOP counts and the Hugging Face adapter. No parallelism here."""
