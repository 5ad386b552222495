"""QArtSR: low-bit quantization of one-step diffusion SR models (TRQ + RPQ + extended training).

Model-agnostic engine; the models it runs on follow this *one-step SR contract*:

- ``model(lr)``: LR ``(N, 3, H, W)`` in [0, 1] → SR ``(N, 3, sH, sW)`` (unclamped);
- ``model.latents(lr) -> (z_L, eps, z_H)``, ``model.decode(z_H)``, ``model.timestep`` and
  ``model.set_timestep(t)`` (one step at a fixed ``t``; x0 update of :mod:`.schedule`);
- ``model.quant_patterns`` / ``model.keep_patterns`` / ``model.lora_patterns`` (``fnmatch`` over
  ``named_modules()``), ``model.denoiser_prefix`` and ``model.rpq_modules()`` (ordered module chain).

Implementations: :class:`~.osd_tiny.OSDSRTiny` (``osd-sr-tiny``, trained here on CPU) and
:class:`~.diffusers_adapter.OSEDiffAdapter` (real OSEDiff from diffusers + user weights).

Public API (import from the submodules; nothing runs at import time, diffusers is imported lazily):

- :mod:`.pipeline`: ``QArtSRConfig``, ``run_qartsr``, ``run_ptq_minmax``, ``run_lsq``, ``QArtSRResult``
- :mod:`.stages`: ``CalibData``, ``run_rpq``, ``run_e2e``, ``rpq_schedule``
- :mod:`.trq`: ``retrain_timestep``, ``measure_latent_error``, ``timestep_sweep``
- :mod:`.schedule`: ``alphas_cumprod``, ``alpha_bar``, ``amplification_factor``, ``x0_from_eps``
- :mod:`.qmodel`: ``QuantSpec``, ``quantize_model``, ``calibrate``, ``set_quant_enabled``,
  ``finetune_parameters``, ``snapshot_original``, ``changed_originals``, ``dequantize_model``
- :mod:`.qlayers`: ``QuantConv2d``, ``QuantLinear``, ``ActPoint``, ``LayerOptions``
- :mod:`.osd_tiny`: ``OSDSRTiny``, ``build_osd_model``; :mod:`.train_tiny`: ``train_osd_tiny``,
  ``TinyTrainOptions``; :mod:`.ckpt`: ``save_model``, ``load_model``
- :mod:`.evaluate`: ``evaluate_sr``, ``psnr_ssim_y``; :mod:`.losses`: ``make_perceptual``
- :mod:`.diffusers_adapter`: ``OSEDiffAdapter``, ``build_osediff``, ``merge_peft_lora``
"""
