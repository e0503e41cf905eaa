"""Where each decoded frame belongs in time: its own timestamp, and the output frames (one
every 1/fps seconds) it shows at. Shared by the whole read and the on-demand read of a
video (data/media.py), and by data check's count of what they give (docs/data.md, "One
clock")."""

from __future__ import annotations

# Two timestamps closer than this are one instant (OpenCV reports milliseconds as floats).
SAME_INSTANT_S = 1e-4


def timed_frames(cap, average_fps: float):
    """(seconds, BGR frame) from the capture's position on. The time is the frame's own
    timestamp from the first frame (OpenCV's POS_MSEC): phones record at a variable frame
    rate, and a frame's index over the average rate drifts from its time by up to seconds
    (the sound, read by time, would drift from the picture). Where a container gives no
    timestamp or repeats the one before, the frame comes one average period after the last;
    the next stamp that advances is believed again (never earlier than the last frame), so
    one repeated stamp does not push every frame after it a period late. That keeps a
    frame's time a function of its own stamp and the one before, the same in a whole read
    and after a seek: FFmpeg's MPEG program streams with B-frames stamp some frames one
    period ahead and then repeat one."""
    import cv2  # OpenCV: only where frames are decoded or written

    last = last_stamp = None
    while True:
        ok, frame = cap.read()
        if not ok:
            return
        stamp = cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
        if last is None:
            t = stamp
        elif stamp > last_stamp + SAME_INSTANT_S:
            t = max(stamp, last)
        else:
            t = last + 1.0 / average_fps
        last, last_stamp = t, stamp
        yield t, frame


class SeekedTooFar(Exception):
    """The first frame after a seek comes after the instant asked for."""


def output_frames(timed, average_fps: float, fps: float, first: int, count: int | None, fit, seeked: bool):
    """Output frames first, first+1, ... (count of them, or to the end), one at a time: output
    frame k shows at k / fps the last source frame whose time has come, and the last source
    frame shows for as long as the one before it did."""
    k, made, shown, shown_t, period = first, 0, None, None, 1.0 / average_fps

    def wanted() -> bool:
        return count is None or made < count

    for t, frame in timed:
        if shown is None and seeked and t > first / fps + SAME_INSTANT_S:
            raise SeekedTooFar
        while shown is not None and wanted() and k / fps + SAME_INSTANT_S < t:
            yield fit(shown)
            k, made = k + 1, made + 1
        if not wanted():
            return
        if shown_t is not None:
            period = t - shown_t
        shown, shown_t = frame, t
    while shown is not None and wanted() and k / fps + SAME_INSTANT_S < shown_t + period:
        yield fit(shown)
        k, made = k + 1, made + 1


def frames_at_output_times(timed, average_fps: float, fps: float, first: int, count: int | None, fit, seeked: bool):
    """output_frames as a list."""
    return list(output_frames(timed, average_fps, fps, first, count, fit, seeked))


def shown_until(times: list[float], average_fps: float) -> float:
    """When the last frame stops showing, as read_video counts it: it shows for as long as
    the frame before it did (one average period when there is only one)."""
    if not times:
        return 0.0
    return times[-1] + (times[-1] - times[-2] if len(times) > 1 else 1.0 / average_fps)
