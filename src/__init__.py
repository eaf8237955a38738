"""lora-sweeps: LoRA/QLoRA fine-tuning sweeps with Hydra, MLflow and Optuna.

Every entry point (``python -m src.train`` ...) imports this first: bitsandbytes, whichever library imports it,
then imports offline and quietly (:func:`src.console.offline_bitsandbytes`), and MLflow keeps its routine
narration (a new store's tables, download bars) off the screen (:func:`src.console.quiet_mlflow`).
"""

from src.console import offline_bitsandbytes, quiet_mlflow

offline_bitsandbytes()
quiet_mlflow()
