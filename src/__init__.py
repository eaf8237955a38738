"""lora-sweeps: LoRA/QLoRA fine-tuning sweeps with Hydra, MLflow and Optuna.

Every entry point (``python -m src.train`` ...) imports this first: bitsandbytes, whichever library imports it,
then imports offline and quietly (:func:`src.console.offline_bitsandbytes`).
"""

from src.console import offline_bitsandbytes

offline_bitsandbytes()
