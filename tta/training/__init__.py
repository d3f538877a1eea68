"""Changing weights: per-task training examples (`examples`), adapters and the training loop
(`finetune`), and pretraining the base model (`pretrain`)."""
