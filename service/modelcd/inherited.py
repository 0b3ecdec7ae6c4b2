"""The part of the service's environment that an interpreter of a model's environment
inherits: scoring processes, batch workers, and the imports an environment's build runs."""

from __future__ import annotations

from collections.abc import Mapping

# What a scoring process inherits from the control plane: an allow-list, because a model's
# own code runs there and the control plane's environment holds secrets (GITHUB_TOKEN, cloud
# keys, MODELCD_*). Kept: what any program needs (paths, locale, time zone, temp dir, trust
# store) and the knobs numeric libraries read (threads, CPU type). A model that needs more
# gets it from its policy's ``env``.
INHERITED_ENV = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TEMP", "TMP",
    "LD_LIBRARY_PATH", "SSL_CERT_FILE", "SSL_CERT_DIR", "CUDA_VISIBLE_DEVICES",
    "PYTHONDONTWRITEBYTECODE", "PYTHONIOENCODING", "PYTHONUTF8", "PYTHONHASHSEED",
})
INHERITED_ENV_PREFIXES = ("LC_", "OMP_", "KMP_", "OPENBLAS_", "GOTO_", "MKL_", "BLIS_", "NVPL_", "NUMEXPR_",
                          "VECLIB_")


def inherited_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The allow-listed part of ``environ`` (see INHERITED_ENV) that a scoring process inherits."""
    return {k: v for k, v in environ.items() if k in INHERITED_ENV or k.startswith(INHERITED_ENV_PREFIXES)}
