"""What initialization did, per layer: map reconstruction errors, latent energy, sizes and cache bytes."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

ERROR_KEYS = ("q_rel_err", "k_rel_err", "v_rel_err")  # per layer; absent for randomly initialized mixers


@dataclass
class InitReport:
    teacher_family: str
    teacher_params: int
    student_params: int
    teacher_kv_bytes_per_token: int
    student_kv_bytes_per_token: int
    student_state_bytes: int  # constant Mamba2 state per sequence
    mixer_settings: dict[str, dict]  # {kind name: its settings after init} of the kinds the student uses
    # {"layer", "mixer", "q_rel_err", "k_rel_err", ...}; calibrated layers add "calib_rel_err_before" / "_after"
    layers: list[dict] = field(default_factory=list)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    def table(self) -> str:
        header = ("layer", 5), ("mixer", 6), ("rank", 5), ("energy", 7), ("q err", 8), ("k err", 8), ("v err", 8)
        lines = [" ".join(f"{name:>{width}}" for name, width in header) + f" {'attn err':>8} {'calibration':>14}"]
        for row in self.layers:
            rank = row.get("kv_lora_rank", "-")
            energy = f"{row['kv_energy']:.4f}" if "kv_energy" in row else "-"
            attn = f"{row['attn_out_rel_err']:8.1e}" if "attn_out_rel_err" in row else f"{'-':>8}"
            errs = " ".join(f"{row[k]:8.1e}" if k in row else f"{'-':>8}" for k in ERROR_KEYS)
            calib = (
                f"{row['calib_rel_err_before']:.3f} -> {row['calib_rel_err_after']:.3f}"
                if "calib_rel_err_after" in row
                else "-"
            )
            lines.append(f"{row['layer']:>5} {row['mixer']:>6} {rank:>5} {energy:>7} {errs} {attn} {calib:>14}")
        share = 100 * self.student_kv_bytes_per_token / max(self.teacher_kv_bytes_per_token, 1)
        lines.append(
            f"params: teacher {self.teacher_params:,}, student {self.student_params:,}; KV bytes/token (bf16): "
            f"teacher {self.teacher_kv_bytes_per_token}, student {self.student_kv_bytes_per_token} ({share:.2f} %) "
            f"+ {self.student_state_bytes} B constant state"
        )
        return "\n".join(lines)
