"""SmoothQuant calibration and smoothing, for readers of the TensorRT-LLM example layout.

The code lives in the package: ``llama_engine/smoothquant.py`` (``calibrate_source``,
``capture_stats``, ``smooth_unified``, ``synthetic_calibration`` ...). ``hf_llama_convert.py
-sq ALPHA`` and ``build.py --use_smooth_quant`` run it; this file re-exports it so
``import smoothquant`` keeps working from the example directory.
"""
from llama_engine.smoothquant import *  # noqa: F401,F403
from llama_engine.smoothquant import (DEFAULT_CALIB_DATASET, DEFAULT_CALIB_LENGTH,  # noqa: F401
                                      DEFAULT_CALIB_SIZE, SYNTHETIC, SYNTHETIC_LABEL,
                                      _cache_layers, _running_max, calibrate,
                                      calibrate_source, calibration_prompts, capture_stats,
                                      hf_model_from_state_dict, smooth_unified,
                                      smoothing_factors, synthetic_calibration,
                                      synthetic_calibration_prompts)
