"""Predictions you can see: for a few fixed held-out clips, the last window's frames with
what the decoder predicts for them underneath (present frames from the window's latent,
future frames from the evolved one), and the audio target against its prediction.

The model predicts each patch normalised to zero mean and unit variance (the loss scores
structure, not brightness: MAE's norm_pix_loss), so a prediction is turned back into
pixels with the true patch's own mean and spread, as MAE draws its reconstructions: what
the picture shows is the predicted structure in each patch.

The frame grid needs only numpy; the audio plot needs matplotlib and is skipped without it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from einops import rearrange

CLIPS = 4  # clips in the picture
GAP = 2  # pixels between frames
PRESENT_FUTURE_LINE = (255, 60, 60)  # the column between the present and the future frames


def to_pixels(pred: torch.Tensor, truth: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Normalised patch predictions -> the true patches' scale."""
    mean = truth.mean(dim=-1, keepdim=True)
    std = torch.sqrt(truth.var(dim=-1, keepdim=True, unbiased=False) + eps)
    return pred * std + mean


def frames(patches: torch.Tensor, grid: tuple[int, int, int], tubelet: tuple[int, int, int]) -> np.ndarray:
    """(B, Nv, t*h*w*3) -> uint8 frames (B, T, H, W, 3)."""
    (nt, nh, nw), (t, h, w) = grid, tubelet
    video = rearrange(patches, "b (nt nh nw) (t h w c) -> b (nt t) (nh h) (nw w) c", nt=nt, nh=nh, nw=nw, t=t, h=h, w=w)
    return (video.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def frame_grid(truth: np.ndarray, predicted: np.ndarray, present_frames: int) -> np.ndarray:
    """Rows: each clip's true frames over its predicted ones; columns: time. A red column
    separates the present (read) frames from the future (predicted) ones."""
    clips, count, height, width, _ = truth.shape
    row_h, col_w = height + GAP, width + GAP
    out = np.full((clips * 2 * row_h + GAP, count * col_w + GAP + GAP, 3), 255, np.uint8)
    for clip in range(clips):
        for kind, source in enumerate((truth, predicted)):
            top = (clip * 2 + kind) * row_h + GAP
            for f in range(count):
                left = f * col_w + GAP + (GAP if f >= present_frames else 0)
                out[top : top + height, left : left + width] = source[clip, f]
    line = present_frames * col_w + GAP // 2
    out[:, line : line + GAP] = PRESENT_FUTURE_LINE
    return out


def geometry_of(model) -> dict:
    """What turns the model's patches back into frames and samples."""
    nt, nh, nw = model.grid
    t = model.config.tubelet[0]
    return {
        "grid": (nt, nh, nw),
        "tubelet": tuple(model.config.tubelet),
        "present_frames": model.video_present // (nh * nw) * t,
        "present_samples": model.audio_present * model.config.audio_segment,
    }


def picture_clips(heldout: np.ndarray) -> np.ndarray:
    """CLIPS held-out clips spread over the list (so over several videos), the same every time."""
    return heldout[:: max(1, len(heldout) // CLIPS)][:CLIPS]


def prediction_pictures(predicted: dict[str, torch.Tensor], model_geometry: dict) -> dict:
    """{"video": HWC uint8 grid, "audio": (truth, prediction) waveforms (B, S) as numpy}."""
    truth_v = predicted["video"]
    pred_v = to_pixels(predicted["video_pred"], truth_v)
    grid, tubelet = model_geometry["grid"], model_geometry["tubelet"]
    picture = frame_grid(
        frames(truth_v, grid, tubelet), frames(pred_v, grid, tubelet), model_geometry["present_frames"]
    )
    truth_a = predicted["audio"]
    pred_a = to_pixels(predicted["audio_pred"], truth_a)
    return {
        "video": picture,
        "audio": (truth_a.flatten(1).cpu().numpy(), pred_a.clamp(-1, 1).flatten(1).cpu().numpy()),
        "present_samples": model_geometry["present_samples"],
    }


def audio_figure(truth: np.ndarray, predicted: np.ndarray, present_samples: int):
    """matplotlib: each clip's audio target and prediction over the window (ImportError
    without matplotlib)."""
    import matplotlib  # optional: only for this plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional: after choosing the Agg backend above

    figure, axes = plt.subplots(len(truth), 1, figsize=(9, 1.4 * len(truth) + 0.6), sharex=True, squeeze=False)
    for row, ax in enumerate(axes[:, 0]):
        ax.plot(truth[row], linewidth=0.6, label="target")
        ax.plot(predicted[row], linewidth=0.6, alpha=0.8, label="prediction")
        ax.axvline(present_samples, color="red", linewidth=0.8)
        ax.set_yticks([])
    axes[0, 0].legend(loc="upper right", fontsize="small")
    axes[-1, 0].set_xlabel("sample in the last window (red: present | future)")
    figure.tight_layout()
    return figure


def save_pictures(pictures: dict, out_dir) -> list:
    """predictions.png (the frame grid, through OpenCV) and predictions_audio.png (where
    matplotlib is installed) in out_dir; the paths written."""
    import cv2  # opencv-python-headless: already how rigtrain reads videos

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "predictions.png"]
    cv2.imwrite(str(written[0]), cv2.cvtColor(pictures["video"], cv2.COLOR_RGB2BGR))
    try:
        figure = audio_figure(*pictures["audio"], pictures["present_samples"])
    except ImportError:
        return written
    import matplotlib.pyplot as plt  # optional: present, since audio_figure just used it

    written.append(out_dir / "predictions_audio.png")
    figure.savefig(written[-1], dpi=100)
    plt.close(figure)
    return written
