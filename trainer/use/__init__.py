"""Using a trained model: export to a Hugging Face directory, generate and chat."""
