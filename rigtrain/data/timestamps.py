"""Where each decoded frame belongs in time: its own timestamp, and the output frames (one
every 1/fps seconds) it shows at. Shared by the whole read and the on-demand read of a
video (data/media.py), and by data check's count of what they give (docs/data.md, "One
clock")."""

from __future__ import annotations

import math
from collections import deque

# Two timestamps closer than this are one instant (OpenCV reports milliseconds as floats).
SAME_INSTANT_S = 1e-4

# A frame's picture is converted (OpenCV's retrieve: YUV to BGR, and for HDR video the tone
# mapping, 5x the decoding at 4K) only when an output instant comes within this many of the
# longest recent gaps between frames after it (and a millisecond, so that a gap of exactly
# that many is no guess): a phone's 60 fps resampled to 8 converts about one frame in four,
# 30 fps one in two. A frame after a longer gap (a variable rate slowing down) shows that
# the picture passed over was wanted after all: NeedEveryFrame, and the read is made again
# from the output frame it got to, converting that picture too.
LOOK_AHEAD_GAPS = 2.0
LOOK_AHEAD_MARGIN_S = 1e-3
RECENT_GAPS = 16


class NeedEveryFrame(Exception):
    """A frame whose picture was not converted turned out to show at an output instant."""

    def __init__(self, at_s: float):
        super().__init__(f"the picture at {at_s:.6f} s was passed over")
        self.at_s = at_s


def timed_frames(cap, average_fps: float, need=None):
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
        ok, frame = cap.read() if need is None else (cap.grab(), None)
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
        if need is not None and need(t):
            ok, frame = cap.retrieve()
            if not ok:
                return
        yield t, frame  # frame None: decoded, its picture not converted (`need` said no)


class SeekedTooFar(Exception):
    """The first frame after a seek comes after the instant asked for."""


class _Resampler:
    """Output frames first, first+1, ... (count of them, or to the end), one at a time
    (`run`): output frame k shows at k / fps the last source frame whose time has come, and
    the last source frame shows for as long as the one before it did. timed_frames asks it
    before converting a picture whether any output instant may show it (`picture_needed`)."""

    def __init__(self, average_fps: float, fps: float, first: int, count: int | None, fit, seeked: bool, must=()):
        self.fps, self.first, self.count, self.fit, self.seeked = fps, first, count, fit, seeked
        self.must = tuple(must)  # times of pictures an earlier read passed over and needed
        self.k, self.made, self.period = first, 0, 1.0 / average_fps
        self.gaps: deque[float] = deque([1.0 / average_fps], maxlen=RECENT_GAPS)

    def wanted(self, made: int | None = None) -> bool:
        return self.count is None or (self.made if made is None else made) < self.count

    def picture_needed(self, t: float) -> bool:
        """Whether the frame at t may show at an output instant: the first instant it would
        show at (once the frames before it had theirs) comes before t + a look-ahead."""
        k = max(self.k, math.ceil((t - SAME_INSTANT_S) * self.fps))
        while k > self.k and (k - 1) / self.fps + SAME_INSTANT_S >= t:
            k -= 1
        while k / self.fps + SAME_INSTANT_S < t:
            k += 1
        if not self.wanted(self.made + k - self.k):
            return False
        if any(abs(t - at) < SAME_INSTANT_S for at in self.must):
            return True
        return k / self.fps + SAME_INSTANT_S < t + LOOK_AHEAD_GAPS * max(self.gaps) + LOOK_AHEAD_MARGIN_S

    def _give(self, shown, shown_t: float):
        if shown is None:
            raise NeedEveryFrame(shown_t)
        self.k, self.made = self.k + 1, self.made + 1
        return self.fit(shown)

    def run(self, timed):
        have, shown, shown_t = False, None, None
        for t, frame in timed:
            if not have and self.seeked and t > self.first / self.fps + SAME_INSTANT_S:
                raise SeekedTooFar
            while have and self.wanted() and self.k / self.fps + SAME_INSTANT_S < t:
                yield self._give(shown, shown_t)
            if not self.wanted():
                return
            if shown_t is not None:
                self.period = t - shown_t
                self.gaps.append(self.period)
            have, shown, shown_t = True, frame, t
        while have and self.wanted() and self.k / self.fps + SAME_INSTANT_S < shown_t + self.period:
            yield self._give(shown, shown_t)


# Reads made again after NeedEveryFrame before one converts every picture: a variable rate
# that keeps slowing down would otherwise decode the video from the start again each time.
MOST_PASSED_OVER = 3


def frames_from_capture(cap, average_fps: float, fps: float, first: int, count: int | None, fit, seeked: bool, must=()):
    """The output frames of an OpenCV capture from its position on, converting only the pictures
    that may show and those at the times in `must`; every picture once `must` holds
    MOST_PASSED_OVER. NeedEveryFrame when a picture passed over was needed: read again with
    its time added to `must`."""
    resampler = _Resampler(average_fps, fps, first, count, fit, seeked, must)
    every_picture = len(resampler.must) >= MOST_PASSED_OVER
    return resampler.run(timed_frames(cap, average_fps, None if every_picture else resampler.picture_needed))


def shown_until(times: list[float], average_fps: float) -> float:
    """When the last frame stops showing, as read_video counts it: it shows for as long as
    the frame before it did (one average period when there is only one)."""
    if not times:
        return 0.0
    return times[-1] + (times[-1] - times[-2] if len(times) > 1 else 1.0 / average_fps)
