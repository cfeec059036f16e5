"""ddpm-jax: Denoising Diffusion Probabilistic Models in JAX/Flax.

The pieces, importable from the top level (loaded on first use, so that
`import ddpm_jax` stays cheap for the CLIs):

    schedule:   Schedule, linear_beta_schedule, cosine_beta_schedule, schedule_from_betas, make_schedule,
                q_sample, predict_x0, posterior_mean, reverse_mean, respace, respaced_timesteps, spaced_timesteps
    models:     ArticleUNet, article_sinusoidal_table, create_model
    objectives: target, to_eps, loss_weights
    training:   TrainState, run_keys, create_optimizer, create_train_state, diffusion_loss,
                train_step, train_chunk, epoch_permutation
    sampling:   SampleOptions, sample, sample_batched, sample_keys, reverse_step, guided_output
    generate:   load_trained, generate, PartialSamples
    batching:   batched
    evaluation: evaluate_checkpoint, evaluate_samples_file
    data:       load_split, load_config_split, to_model_range, from_model_range, class_names, label_index
    checkpoint: load_checkpoint
    viz:        save_grid, save_gif, make_grid, gif_frames, save_forward
    run:        train_and_evaluate
    config:     base_config
    errors:     UserError
"""

import importlib

from ddpm_jax.errors import UserError

_EXPORTS = {
    "schedule": ["Schedule", "linear_beta_schedule", "cosine_beta_schedule", "schedule_from_betas", "make_schedule", "q_sample",
                 "predict_x0", "posterior_mean", "reverse_mean", "respace", "respaced_timesteps", "spaced_timesteps"],
    "models": ["ArticleUNet", "article_sinusoidal_table", "create_model"],
    "objectives": ["target", "to_eps", "loss_weights"],
    "training": ["TrainState", "run_keys", "create_optimizer", "create_train_state", "diffusion_loss", "train_step",
                 "train_chunk", "epoch_permutation"],
    "sampling": ["SampleOptions", "sample", "sample_batched", "sample_keys", "reverse_step", "guided_output"],
    "generate": ["load_trained", "generate", "PartialSamples"],
    "batching": ["batched"],
    "evaluation": ["evaluate_checkpoint", "evaluate_samples_file"],
    "data": ["load_split", "load_config_split", "to_model_range", "from_model_range", "class_names", "label_index"],
    "checkpoint": ["load_checkpoint"],
    "viz": ["save_grid", "save_gif", "make_grid", "gif_frames", "save_forward"],
    "run": ["train_and_evaluate"],
    "config": ["base_config"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = ["UserError", *_WHERE]


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f"ddpm_jax.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'ddpm_jax' has no attribute {name!r}")
