"""Fine-tuning and distillation: teach a model to play like the players of a run.

``python -m abm.finetune`` trains a LoRA adapter on the examples
``python -m abm.export RUN --validation 0.2`` writes: supervised fine-tuning on the
teacher's answers (TRL's ``SFTTrainer``) or distillation on the teacher's option
probabilities (a KL loss over the two options). It measures how often the model
decides like the teacher on the held-out examples before and after, and writes the
adapter with a card, the loss curve and those figures. An LLM player loads it back
with ``adapter = "FOLDER"``. Needs the ``finetune`` extra (peft, trl, datasets).
"""
