//! The spatial layers of one publication: which SSRC carries which simulcast encoding, how large
//! its pictures are, whether it is flowing, and which layer a subscriber's view needs.
//!
//! A publication without simulcast has one layer. Layers are ordered lowest first: by rid name
//! where it says (`q` < `h` < `f`, `l` < `m` < `h`, `r0` < `r1` < `r2`), else in the order of the
//! offer's `a=simulcast:send` line.

use std::time::{Duration, Instant};

/// Most simulcast encodings a publication may have; further rids are not forwarded.
pub const MAX_LAYERS: usize = 4;

/// A layer that sent nothing for this long is not chosen for anyone.
pub const LAYER_SILENT_AFTER: Duration = Duration::from_millis(1000);

/// A layer covers a view when it is at least this share of the view's width and height (a
/// little upscaling is not seen; a layer twice as large costs twice the bits).
const COVER_NUMERATOR: u32 = 4;
const COVER_DENOMINATOR: u32 = 5;

/// Size assumed for the top layer until a keyframe says (codecs whose headers are not read).
const ASSUMED_TOP: (u16, u16) = (1280, 720);

#[derive(Clone, Debug)]
struct Layer {
    rid: Option<String>,
    ssrc: Option<u32>,
    size: Option<(u16, u16)>,
    last_packet: Option<Instant>,
}

/// Of `count` layers sized by `size`, the smallest that covers a view of `width` x `height`
/// device pixels (the top one when none does); the top layer for no view.
pub fn layer_for_view(count: u8, size: impl Fn(u8) -> (u16, u16), view: Option<(u16, u16)>) -> u8 {
    let top = count.saturating_sub(1);
    let Some((width, height)) = view else {
        return top;
    };
    let covers = |index: u8| {
        let (w, h) = size(index);
        u32::from(w) * COVER_DENOMINATOR >= u32::from(width) * COVER_NUMERATOR
            && u32::from(h) * COVER_DENOMINATOR >= u32::from(height) * COVER_NUMERATOR
    };
    (0..top).find(|&index| covers(index)).unwrap_or(top)
}

/// The layer table of one publication.
#[derive(Clone, Debug)]
pub struct Layers {
    layers: Vec<Layer>,
}

/// Where a rid name puts a layer, lowest 0, when its name says.
fn rank_of(rid: &str) -> Option<u32> {
    match rid.to_ascii_lowercase().as_str() {
        "q" | "l" | "low" | "lo" => Some(0),
        "h" | "m" | "mid" | "medium" => Some(1),
        "f" | "hi" | "high" | "full" => Some(2),
        other => other
            .trim_start_matches(['r', 'R'])
            .parse::<u32>()
            .ok()
            .filter(|n| *n < 16),
    }
}

impl Layers {
    /// One layer: a publication without simulcast.
    pub fn single() -> Self {
        Self {
            layers: vec![Layer {
                rid: None,
                ssrc: None,
                size: None,
                last_packet: None,
            }],
        }
    }

    /// The layers of a simulcast publication, from the rids of its `a=simulcast:send` line in
    /// the offer's order. Fewer than two rids is no simulcast.
    pub fn simulcast(rids: &[String]) -> Self {
        let mut rids: Vec<&String> = rids.iter().take(MAX_LAYERS).collect();
        if rids.len() < 2 {
            return Self::single();
        }
        if rids.iter().all(|rid| rank_of(rid).is_some()) {
            rids.sort_by_key(|rid| rank_of(rid));
        }
        Self {
            layers: rids
                .into_iter()
                .map(|rid| Layer {
                    rid: Some(rid.clone()),
                    ssrc: None,
                    size: None,
                    last_packet: None,
                })
                .collect(),
        }
    }

    /// Number of layers: at least one.
    pub fn count(&self) -> usize {
        self.layers.len()
    }

    /// True for a publication without simulcast.
    pub fn is_single(&self) -> bool {
        self.layers.len() == 1
    }

    /// The rid of layer `index`.
    pub fn rid(&self, index: u8) -> Option<&str> {
        self.layers.get(usize::from(index))?.rid.as_deref()
    }

    /// The SSRC layer `index` arrives on, once known.
    pub fn ssrc(&self, index: u8) -> Option<u32> {
        self.layers.get(usize::from(index))?.ssrc
    }

    /// Records that `ssrc` carries `rid` (the stream opened). A rid not offered is ignored.
    pub fn open(&mut self, ssrc: u32, rid: Option<&str>) {
        if self.is_single() {
            self.layers[0].ssrc.get_or_insert(ssrc);
            return;
        }
        if let Some(layer) = self
            .layers
            .iter_mut()
            .find(|layer| rid.is_some() && layer.rid.as_deref() == rid)
        {
            layer.ssrc = Some(ssrc);
        }
    }

    /// The layer a packet of `ssrc` belongs to; `None` for an SSRC no rid was opened on.
    #[inline]
    pub fn index_of(&self, ssrc: u32) -> Option<u8> {
        if self.is_single() {
            return Some(0);
        }
        self.layers
            .iter()
            .position(|layer| layer.ssrc == Some(ssrc))
            .map(|index| index as u8)
    }

    /// Notes a packet on layer `index` at `now`.
    #[inline]
    pub fn saw_packet(&mut self, index: u8, now: Instant) {
        if let Some(layer) = self.layers.get_mut(usize::from(index)) {
            layer.last_packet = Some(now);
        }
    }

    /// Records the picture size a keyframe of layer `index` declared.
    pub fn saw_size(&mut self, index: u8, size: (u16, u16)) {
        if let Some(layer) = self.layers.get_mut(usize::from(index)) {
            layer.size = Some(size);
        }
    }

    /// True when layer `index` sent something within [`LAYER_SILENT_AFTER`].
    pub fn is_live(&self, index: u8, now: Instant) -> bool {
        self.layers
            .get(usize::from(index))
            .and_then(|layer| layer.last_packet)
            .is_some_and(|at| now.saturating_duration_since(at) < LAYER_SILENT_AFTER)
    }

    /// The picture size of layer `index`: from its keyframes, else assumed from the layers
    /// above it (each half the size of the next).
    pub fn size(&self, index: u8) -> (u16, u16) {
        let index = usize::from(index).min(self.layers.len() - 1);
        if let Some(size) = self.layers[index].size {
            return size;
        }
        let (mut width, mut height) = ASSUMED_TOP;
        let mut from = self.layers.len() - 1;
        if let Some((known, size)) = self.layers[index..]
            .iter()
            .enumerate()
            .find_map(|(offset, layer)| layer.size.map(|size| (index + offset, size)))
        {
            (width, height) = size;
            from = known;
        }
        let halvings = (from - index) as u32;
        (width >> halvings.min(15), height >> halvings.min(15))
    }

    /// The smallest layer that covers a view of `width` x `height` device pixels (the top one
    /// when none does); the top layer for no view.
    pub fn for_view(&self, view: Option<(u16, u16)>) -> u8 {
        let count = self.layers.len() as u8;
        layer_for_view(count, |index| self.size(index), view)
    }

    /// What to forward for a subscriber that asks for layer `wanted`: the highest live layer at
    /// or below it, else the lowest live one above it; `wanted` when nothing flows yet.
    pub fn live_target(&self, wanted: u8, now: Instant) -> u8 {
        let top = (self.layers.len() - 1) as u8;
        let wanted = wanted.min(top);
        (0..=wanted)
            .rev()
            .find(|&index| self.is_live(index, now))
            .or_else(|| (wanted + 1..=top).find(|&index| self.is_live(index, now)))
            .unwrap_or(wanted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rids(names: &[&str]) -> Vec<String> {
        names.iter().map(|name| (*name).to_owned()).collect()
    }

    #[test]
    fn layers_are_ordered_lowest_first() {
        let cases: &[(&[&str], &[&str])] = &[
            (&["q", "h", "f"], &["q", "h", "f"]),
            (&["f", "h", "q"], &["q", "h", "f"]),
            (&["hi", "mid", "lo"], &["lo", "mid", "hi"]),
            (&["r2", "r0", "r1"], &["r0", "r1", "r2"]),
            // Names that say nothing keep the offer's order.
            (&["a", "b", "c"], &["a", "b", "c"]),
            (&["1", "2", "3", "4", "5"], &["1", "2", "3", "4"]),
        ];
        for (offered, expected) in cases {
            let layers = Layers::simulcast(&rids(offered));
            let got: Vec<_> = (0..layers.count() as u8)
                .map(|index| layers.rid(index).unwrap_or(""))
                .collect();
            assert_eq!(got, *expected, "{offered:?}");
        }
        assert!(Layers::simulcast(&rids(&["only"])).is_single());
    }

    #[test]
    fn packets_find_their_layer_by_ssrc() {
        let mut layers = Layers::simulcast(&rids(&["q", "h", "f"]));
        layers.open(30, Some("f"));
        layers.open(10, Some("q"));
        layers.open(99, Some("x"));
        assert_eq!(layers.index_of(10), Some(0));
        assert_eq!(layers.index_of(30), Some(2));
        assert_eq!(layers.index_of(20), None, "h not open yet");
        assert_eq!(layers.index_of(99), None, "a rid not offered");
        let mut single = Layers::single();
        single.open(5, None);
        assert_eq!(single.index_of(77), Some(0), "one layer takes everything");
    }

    #[test]
    fn a_view_gets_the_smallest_layer_that_covers_it() {
        let mut layers = Layers::simulcast(&rids(&["q", "h", "f"]));
        layers.saw_size(2, (1280, 720));
        // q and h are assumed at 320x180 and 640x360 until their keyframes say.
        let cases: &[(Option<(u16, u16)>, u8)] = &[
            (None, 2),
            (Some((160, 90)), 0),
            (Some((400, 225)), 0), // 320 is 80 % of 400
            (Some((401, 226)), 1),
            (Some((800, 450)), 1),
            (Some((801, 451)), 2),
            (Some((3840, 2160)), 2),
        ];
        for &(view, layer) in cases {
            assert_eq!(layers.for_view(view), layer, "{view:?}");
        }
        layers.saw_size(0, (160, 90));
        assert_eq!(layers.for_view(Some((320, 180))), 1, "q measured smaller");
    }

    #[test]
    fn only_live_layers_are_chosen() {
        let mut layers = Layers::simulcast(&rids(&["q", "h", "f"]));
        let start = Instant::now();
        assert_eq!(layers.live_target(2, start), 2, "nothing flows yet");
        layers.saw_packet(0, start);
        layers.saw_packet(1, start);
        assert_eq!(layers.live_target(2, start), 1, "f never came");
        let later = start + Duration::from_millis(500);
        layers.saw_packet(2, later);
        assert_eq!(layers.live_target(2, later), 2);
        assert_eq!(layers.live_target(0, later), 0);
        let much_later = start + Duration::from_millis(1400);
        assert_eq!(layers.live_target(0, much_later), 2, "q and h went silent");
    }
}
