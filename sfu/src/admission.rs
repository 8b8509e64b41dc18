//! Admission into the engine: how many forwarded copies may wait for it, so that a
//! server past its capacity sheds load at once (the same subscribers keep being served, and
//! whole video frames are shed) instead of building a queue everyone waits behind.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::exchange::Outgoing;

/// How far behind the engine may fall before fanouts drop further packets (and ask for a
/// keyframe): a server past its capacity sheds load at once instead of building a queue that
/// every subscriber waits behind. The engine turns this into a number of waiting copies from
/// the time it has lately taken per copy, so a starved engine admits fewer.
const BACKLOG_BUDGET: Duration = Duration::from_millis(40);
/// Bounds of that number of copies (the lower one is a round's worth).
pub(crate) const MIN_BACKLOG_COPIES: usize = ROUND_COPIES;
pub(crate) const MAX_BACKLOG_COPIES: usize = 65_536;
/// Copies admitted before the engine has measured itself: 40 ms at 5 µs per copy.
pub(crate) const INITIAL_BACKLOG_COPIES: usize = 8192;
/// Forwarded copies taken in one round (about 10 ms of work): after a round the engine lets
/// the fanouts and publish connections run, so a busy engine never starves its own sources.
pub(crate) const ROUND_COPIES: usize = 2048;

/// How much of the engine's backlog a batch may fill.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Twice the limit: audio (losing a voice hurts more than losing a picture).
    Priority,
    /// [`FRAME_REST_FACTOR`] times the limit: the rest of a video frame whose first packet was
    /// admitted. A frame cut short wastes what was sent of it and leaves its subscriber waiting
    /// for a keyframe (seconds, with an encoder that ignores requests), and a keyframe is ten or
    /// more times a frame, to everyone at once.
    FrameRest,
    /// The limit, not counting the rest of frames already admitted (they are owed, and drain):
    /// the first packet of a video frame.
    Normal,
}

/// How far past the limit the rest of admitted frames may fill the backlog: at most 320 ms of
/// the engine's work, a moment's delay against a picture lost for seconds.
const FRAME_REST_FACTOR: usize = 8;

/// Forwarded copies for the engine, as one admission took them.
pub(crate) struct MediaBatch {
    pub(crate) copies: Vec<Outgoing>,
    /// They are the rest of admitted frames ([`Admission::FrameRest`]).
    pub(crate) frame_rest: bool,
}

/// Why forwarded copies were not taken.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The engine is behind by its backlog limit (or its queue is full).
    Overloaded,
    /// The engine has stopped.
    Closed,
}

/// The way forwarded copies go into the engine's media queue, with the count of those waiting
/// in it.
#[derive(Clone)]
pub(crate) struct MediaSender {
    media: mpsc::Sender<MediaBatch>,
    backlog: Arc<Backlog>,
}

/// Forwarded copies handed over and not yet written, and how many may be.
#[derive(Debug)]
pub(crate) struct Backlog {
    pub(crate) waiting: AtomicUsize,
    /// Of those, the rest of admitted frames.
    pub(crate) frame_rest: AtomicUsize,
    pub(crate) limit: AtomicUsize,
}

impl Default for Backlog {
    fn default() -> Self {
        Self {
            waiting: AtomicUsize::new(0),
            frame_rest: AtomicUsize::new(0),
            limit: AtomicUsize::new(INITIAL_BACKLOG_COPIES),
        }
    }
}

impl Backlog {
    /// Records that the engine took `copies`, `frame_rest` of them the rest of admitted frames;
    /// returns how many still wait.
    pub(crate) fn processed(&self, copies: usize, frame_rest: usize) -> usize {
        self.frame_rest.fetch_sub(frame_rest, Ordering::Relaxed);
        self.waiting.fetch_sub(copies, Ordering::Relaxed) - copies
    }

    /// Records that `copies` took `elapsed` to write and send: the limit becomes what fits in
    /// [`BACKLOG_BUDGET`] at the recent pace (a moving average, so one slow round does not
    /// close the door).
    pub(crate) fn measured(&self, copies: usize, elapsed: Duration, pace: &mut f64) {
        if copies == 0 {
            return;
        }
        let per_copy = elapsed.as_secs_f64() / copies as f64;
        *pace = if *pace == 0.0 {
            per_copy
        } else {
            0.8 * *pace + 0.2 * per_copy
        };
        let limit = (BACKLOG_BUDGET.as_secs_f64() / pace.max(1e-9)).round() as usize;
        self.limit.store(
            limit.clamp(MIN_BACKLOG_COPIES, MAX_BACKLOG_COPIES),
            Ordering::Relaxed,
        );
    }
}

impl MediaSender {
    pub(crate) fn new(media: mpsc::Sender<MediaBatch>, backlog: Arc<Backlog>) -> Self {
        Self { media, backlog }
    }

    /// Hands over forwarded copies unless the engine is too far behind.
    pub(crate) fn try_forward(&self, mut packets: Vec<Outgoing>) -> Result<(), Refused> {
        let copies = packets.len();
        if self.try_forward_some(&mut packets, Admission::Normal)? < copies {
            return Err(Refused::Overloaded);
        }
        Ok(())
    }

    /// Hands over as many of `packets` as the engine's backlog has room for, from the front, and
    /// returns how many; the rest stay in `packets`. So an overloaded engine keeps serving the
    /// same subscribers fully instead of every subscriber losing packets (and, for video,
    /// waiting for keyframes) in turn.
    pub(crate) fn try_forward_some(
        &self,
        packets: &mut Vec<Outgoing>,
        admission: Admission,
    ) -> Result<usize, Refused> {
        let waiting = &self.backlog.waiting;
        let limit = self.backlog.limit.load(Ordering::Relaxed);
        let limit = match admission {
            Admission::Priority => limit * 2,
            Admission::FrameRest => limit * FRAME_REST_FACTOR,
            Admission::Normal => limit + self.backlog.frame_rest.load(Ordering::Relaxed),
        };
        let wanted = packets.len();
        let mut admitted = 0;
        let _ = waiting.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |now| {
            admitted = wanted.min(limit.saturating_sub(now));
            (admitted > 0).then_some(now + admitted)
        });
        if admitted == 0 {
            return if self.media.is_closed() {
                Err(Refused::Closed)
            } else {
                Ok(0)
            };
        }
        let taken = if admitted < wanted {
            let rest = packets.split_off(admitted);
            std::mem::replace(packets, rest)
        } else {
            std::mem::take(packets)
        };
        let frame_rest = admission == Admission::FrameRest;
        if frame_rest {
            self.backlog
                .frame_rest
                .fetch_add(admitted, Ordering::Relaxed);
        }
        let batch = MediaBatch {
            copies: taken,
            frame_rest,
        };
        match self.media.try_send(batch) {
            Ok(()) => Ok(admitted),
            Err(err) => {
                if frame_rest {
                    self.backlog
                        .frame_rest
                        .fetch_sub(admitted, Ordering::Relaxed);
                }
                waiting.fetch_sub(admitted, Ordering::Relaxed);
                match err {
                    mpsc::error::TrySendError::Full(_) => Ok(0),
                    mpsc::error::TrySendError::Closed(_) => Err(Refused::Closed),
                }
            }
        }
    }

    pub(crate) fn same_engine(&self, other: &MediaSender) -> bool {
        self.media.same_channel(&other.media)
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.media.is_closed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exchange::Class;
    use rtc::rtp;
    use rtc::rtp_transceiver::RTCRtpSenderId;

    /// Room for every batch these tests hand over.
    const MEDIA_QUEUE: usize = 8192;

    fn copies(n: usize) -> Vec<Outgoing> {
        (0..n)
            .map(|_| Outgoing {
                conn: crate::exchange::ConnId(1),
                sender: RTCRtpSenderId::default(),
                packet: rtp::Packet::default(),
                class: Class::Video,
            })
            .collect()
    }

    #[test]
    fn fanouts_are_refused_once_the_engine_is_a_backlog_behind_and_admitted_once_it_catches_up() {
        let (media, mut queue) = mpsc::channel(MEDIA_QUEUE);
        let backlog = Arc::new(Backlog::default());
        let sender = MediaSender::new(media, backlog.clone());
        let batch = 512;
        let fit = INITIAL_BACKLOG_COPIES / batch;
        for _ in 0..fit {
            assert_eq!(sender.try_forward(copies(batch)), Ok(()));
        }
        // Nothing partial: a batch that would pass the limit is refused whole, and not counted.
        assert_eq!(sender.try_forward(copies(batch)), Err(Refused::Overloaded));
        assert_eq!(backlog.waiting.load(Ordering::Relaxed), fit * batch);
        // The engine writes one batch (and says so): there is room for one more.
        let Ok(taken) = queue.try_recv() else {
            panic!("the first batch is not in the queue");
        };
        backlog.processed(taken.copies.len(), 0);
        assert_eq!(sender.try_forward(copies(batch)), Ok(()));
        // An engine that has stopped refuses even when there is room.
        backlog.waiting.store(0, Ordering::Relaxed);
        drop(queue);
        assert_eq!(sender.try_forward(copies(1)), Err(Refused::Closed));
    }

    #[test]
    fn an_engine_with_room_for_some_copies_takes_those_and_leaves_the_rest() {
        let (media, mut queue) = mpsc::channel(MEDIA_QUEUE);
        let backlog = Arc::new(Backlog::default());
        backlog
            .waiting
            .store(INITIAL_BACKLOG_COPIES - 100, Ordering::Relaxed);
        let sender = MediaSender::new(media, backlog.clone());
        let mut batch = copies(300);
        let admitted = sender.try_forward_some(&mut batch, Admission::Normal);
        assert_eq!(admitted, Ok(100));
        assert_eq!(batch.len(), 200, "the refused copies are handed back");
        assert!(matches!(queue.try_recv(), Ok(taken) if taken.copies.len() == 100));
        assert_eq!(
            backlog.waiting.load(Ordering::Relaxed),
            INITIAL_BACKLOG_COPIES
        );
        // Full: nothing is taken, nothing is lost from the batch, and it is not an error.
        assert_eq!(
            sender.try_forward_some(&mut batch, Admission::Normal),
            Ok(0)
        );
        assert_eq!(batch.len(), 200);
        // Audio may use twice the backlog.
        assert_eq!(
            sender.try_forward_some(&mut batch, Admission::Priority),
            Ok(200)
        );
    }

    /// A keyframe's burst to every subscriber is owed once its first packets went out: it may
    /// fill the backlog well past the limit, and the next frames' first packets are measured
    /// against the limit without it, so the subscribers being served keep being served.
    #[test]
    fn the_rest_of_admitted_frames_does_not_shut_out_the_next_frames() {
        let (media, mut queue) = mpsc::channel(MEDIA_QUEUE);
        let backlog = Arc::new(Backlog::default());
        let sender = MediaSender::new(media, backlog.clone());
        let limit = INITIAL_BACKLOG_COPIES;
        let mut first = copies(limit / 2);
        assert_eq!(
            sender.try_forward_some(&mut first, Admission::Normal),
            Ok(limit / 2)
        );
        // The rest of that frame: far more than the limit, up to its own bound.
        let mut rest = copies(FRAME_REST_FACTOR * limit);
        assert_eq!(
            sender.try_forward_some(&mut rest, Admission::FrameRest),
            Ok(FRAME_REST_FACTOR * limit - limit / 2)
        );
        assert_eq!(
            sender.try_forward_some(&mut rest, Admission::FrameRest),
            Ok(0)
        );
        // A new frame's first packets still find the room the limit leaves beside what is owed.
        let mut next = copies(limit);
        assert_eq!(
            sender.try_forward_some(&mut next, Admission::Normal),
            Ok(limit / 2)
        );
        // As the engine takes the owed copies, the count of them falls with the backlog.
        let mut taken = 0;
        while let Ok(batch) = queue.try_recv() {
            let rest = if batch.frame_rest {
                batch.copies.len()
            } else {
                0
            };
            taken += batch.copies.len();
            backlog.processed(batch.copies.len(), rest);
        }
        assert_eq!(taken, FRAME_REST_FACTOR * limit + limit / 2);
        assert_eq!(backlog.waiting.load(Ordering::Relaxed), 0);
        assert_eq!(backlog.frame_rest.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_slower_engine_admits_fewer_copies() {
        let backlog = Backlog::default();
        let mut pace = 0.0;
        // 5 µs per copy: 40 ms is 8000 copies.
        backlog.measured(2000, Duration::from_millis(10), &mut pace);
        assert_eq!(backlog.limit.load(Ordering::Relaxed), 8000);
        // Starved to a fifth of the pace, it converges on a fifth of the copies.
        for _ in 0..40 {
            backlog.measured(2000, Duration::from_millis(50), &mut pace);
        }
        let limit = backlog.limit.load(Ordering::Relaxed);
        assert!(
            (1600..=1700).contains(&limit) || limit == MIN_BACKLOG_COPIES,
            "{limit}"
        );
        // Never below one round, never above the cap.
        backlog.measured(10, Duration::from_secs(10), &mut pace);
        assert_eq!(backlog.limit.load(Ordering::Relaxed), MIN_BACKLOG_COPIES);
        let mut fast = 0.0;
        backlog.measured(1_000_000, Duration::from_millis(1), &mut fast);
        assert_eq!(backlog.limit.load(Ordering::Relaxed), MAX_BACKLOG_COPIES);
    }
}
