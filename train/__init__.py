"""Reward-model training harness: Bradley-Terry reward models on accelerate."""
