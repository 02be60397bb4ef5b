"""What a gradparity report folder records beyond its gradients, as ``gradparity diagnose`` reads it.

A report (``gradparity run``'s schema_version 1, ``gradparity check``'s ``gradparity.check/1``) records the
settings every backend ran with (its dtype, whether TF32 was possible, autocast, the matmul precision it
asked for), the rounding bound the run judged its pairs by, and, for a check, where each port first parts
from the source (``localization``). Diagnose uses them as facts: a cause the recorded settings contradict
is ranked down with that reason, and a check's localization is the leading explanation of a port's
difference. The switches of a run (``[causes]``) are *not* read: diagnose must find them in the numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from gradparity.compare.tolerance import NARROW_FORMATS, UNIT_ROUNDOFF, effective_unit_roundoff
from gradparity.errors import ConfigError

#: The precision settings worth naming, per framework's environment record (key, how to print it).
_PRECISION_KEYS = (("cuda.matmul.allow_tf32", "torch.backends.cuda.matmul.allow_tf32"),
                   ("cudnn.allow_tf32", "torch.backends.cudnn.allow_tf32"),
                   ("jax_default_matmul_precision", "jax_default_matmul_precision"),
                   ("float32_matmul_precision", "float32_matmul_precision"))


@dataclass
class RecordedRun:
    """The facts a report folder records about how its numbers were made.

    ``kind``: "run" or "check"; ``dtype``: the run's dtype; ``rtol``: the report's own rounding bound for that
    dtype (None when it records none); ``environments``: backend -> its environment record (backends that
    ran); ``localizations``: a check's ``localization.by_backend`` rows; ``source``: a check's reference
    framework.
    """

    kind: str
    dtype: str | None
    rtol: float | None
    environments: dict[str, dict] = field(default_factory=dict)
    localizations: list[dict] = field(default_factory=list)
    source: str | None = None

    def narrow(self) -> list[str]:
        """The backends whose arithmetic was narrower than the run's dtype, each in words (empty: none)."""
        out = []
        for backend, env in self.environments.items():
            if env.get("autocast"):
                out.append(f"{backend}: autocast {env['autocast']}")
            elif env.get("dtype") in NARROW_FORMATS:
                out.append(f"{backend}: {env['dtype']}")
            elif self.dtype in UNIT_ROUNDOFF and (effective_unit_roundoff(env) or 0.0) > UNIT_ROUNDOFF[self.dtype]:
                out.append(f"{backend}: TF32 possible ({env.get('device_kind') or env.get('device') or 'device'})")
        return out

    def settings_text(self) -> str:
        """Every backend's recorded precision settings, in words ("torch: float32, TF32 off (...), no autocast")."""
        parts = []
        for backend, env in self.environments.items():
            words = [str(env.get("dtype") or "dtype not recorded")]
            if "tf32" in env:
                words.append("TF32 possible" if env["tf32"] else "TF32 off")
            precision = env.get("precision") if isinstance(env.get("precision"), dict) else {}
            named = [f"{shown} = {precision[key]}" for key, shown in _PRECISION_KEYS if key in precision]
            if named:
                words[-1] += f" ({', '.join(named)})"
            words.append(f"autocast {env['autocast']}" if env.get("autocast") else "no autocast")
            parts.append(f"{backend}: {', '.join(words)}")
        return "; ".join(parts)

    def localized(self) -> list[dict]:
        """The check's localizations that name a layer (a forward/backward layer or a parameter's layer)."""
        return [loc for loc in self.localizations if loc.get("first_layer") or loc.get("parameter_layer")]


def recorded_run(doc: dict, where: str) -> tuple[RecordedRun, dict]:
    """(the facts ``doc`` records, the Info keys it gives: batch_size and dtype) from a report.json object."""
    if doc.get("schema") == "gradparity.check/1" or isinstance(doc.get("check"), dict):
        check = doc.get("check") if isinstance(doc.get("check"), dict) else {}
        dtype = check.get("dtype")
        n = doc.get("n_examples")
        info = {"batch_size": n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else None,
                "dtype": dtype}
        loc = doc.get("localization") if isinstance(doc.get("localization"), dict) else {}
        rows = [r for r in loc.get("by_backend") or [] if isinstance(r, dict)]
        source = check.get("weights_from") if isinstance(check.get("weights_from"), str) else None
        kind = "check"
    else:
        exp = doc.get("experiment")
        data = exp.get("data") if isinstance(exp, dict) else None
        dtype = exp.get("dtype") if isinstance(exp, dict) else None
        info = {"batch_size": data.get("batch_size") if isinstance(data, dict) else None, "dtype": dtype}
        rows, source, kind = [], None, "run"
    if dtype is not None and dtype not in UNIT_ROUNDOFF:
        raise ConfigError(f"{where}: dtype {dtype!r} is not one of {', '.join(UNIT_ROUNDOFF)}")
    tol = doc.get("tolerance") if isinstance(doc.get("tolerance"), dict) else {}
    rtols = tol.get("rtol") if isinstance(tol.get("rtol"), dict) else {}
    rtol = rtols.get(dtype) if isinstance(rtols.get(dtype), (int, float)) and rtols.get(dtype) > 0 else None
    envs = {}
    for row in doc.get("backends") or []:
        if isinstance(row, dict) and row.get("status") == "ok" and isinstance(row.get("environment"), dict):
            envs[str(row.get("backend"))] = row["environment"]
    return RecordedRun(kind, dtype, float(rtol) if rtol else None, envs, rows, source), info
