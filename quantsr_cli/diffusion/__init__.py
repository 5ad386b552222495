"""QArtSR: low-bit quantization of one-step diffusion SR models (TRQ + RPQ + extended training).

Model-agnostic engine; the models it runs on follow this *one-step SR contract*:

- ``model(lr)``: LR ``(N, 3, H, W)`` in [0, 1] → SR ``(N, 3, sH, sW)`` (unclamped);
- ``model.latents(lr) -> (z_L, eps, z_H)``, ``model.decode(z_H)``, ``model.timestep`` and
  ``model.set_timestep(t)`` (one step at a fixed ``t``; :class:`quantsr_cli.models.onestep.OneStepSRMixin`);
- ``model.quant_patterns`` / ``model.keep_patterns`` / ``model.lora_patterns`` (``fnmatch`` over
  ``named_modules()``), ``model.denoiser_prefix`` and ``model.rpq_modules()`` (ordered module chain).

Implementations: the ``one-step-diffusion`` family of :data:`quantsr_cli.models.ARCHS` (``osd-sr-tiny``,
trained here on CPU; built with :func:`quantsr_cli.models.build_model`) and
:class:`~.diffusers_adapter.OSEDiffAdapter` (real OSEDiff from diffusers + user weights; not a registry
entry, since it is built from a Stable Diffusion folder rather than from hyperparameters).

Shared with the rest of quantsr: ``round_ste`` and the integer grids (:mod:`quantsr_cli.quant.primitives`),
the arch registry and strict loader (:mod:`quantsr_cli.models`), training images
(:class:`quantsr_cli.data.TrainDataset`) and evaluation (``quantsr eval`` loads diffusion files;
:func:`quantsr_cli.engine.evaluate.evaluate_model`). Its own: the range quantizers (:mod:`.quantizers`, a
documented interface), the QAT layers with smoothing/low-rank/LoRA (:mod:`.qlayers`) and the stages.

Public API (import from the submodules; nothing runs at import time, diffusers is imported lazily):

- :mod:`.pipeline`: ``QArtSRConfig``, ``run_qartsr``, ``run_ptq_minmax``, ``run_lsq``, ``QArtSRResult``
- :mod:`.stages`: ``CalibData``, ``calibration_data``, ``sample_patches``, ``run_rpq``, ``run_e2e``,
  ``rpq_schedule``
- :mod:`.trq`: ``retrain_timestep``, ``measure_latent_error``, ``timestep_sweep``, ``select_timestep``
- :mod:`.qmodel`: ``QuantSpec``, ``quantize_model``, ``calibrate``, ``set_quant_enabled``,
  ``finetune_parameters``, ``snapshot_original``, ``changed_originals``, ``dequantize_model``
- :mod:`.qlayers`: ``QuantConv2d``, ``QuantLinear``, ``ActPoint`` (built from a layer's ``QuantSpec``)
- :mod:`.quantizers`: ``RangeQuantizer``, ``QUANTIZERS`` (``lbq``, ``lsq``), ``make_quantizer``
- :mod:`.train_tiny`: ``train_osd_tiny``, ``TinyTrainOptions``; :mod:`.ckpt`: ``save_model``, ``load_model``
- :mod:`.losses`: ``make_perceptual``
- :mod:`.diffusers_adapter`: ``OSEDiffAdapter``, ``build_osediff``, ``merge_peft_lora``
"""
