//! Which time intervals of a video get an embedding.
//!
//! The semantics are Vertex AI's `videoSegmentConfig`, shared by every
//! backend so that the same request means the same thing everywhere.

use serde::{Deserialize, Serialize};

use crate::EmbedError;

/// How a video is cut into segments, each of which gets one embedding.
///
/// Every field is optional, as in Vertex's API, because what is left out
/// matters: if only `end_offset_sec` is set, the start is `end - 120`
/// (Vertex's rule); otherwise the start is 0 and the end is `start + 120`.
/// Segments are `[start, start+interval)`, `[start+interval, ...)` up to the
/// end, the last one clipped to the video's real length.
///
/// ```
/// use mmembed_core::VideoSegmentConfig;
///
/// let cfg = VideoSegmentConfig::new(0, 120, 10)?;
/// let segs = cfg.segments(59.0)?;
/// assert_eq!(segs.len(), 6);
/// assert_eq!((segs[5].start_sec, segs[5].end_sec), (50.0, 59.0));
/// # Ok::<(), mmembed_core::EmbedError>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VideoSegmentConfig {
    /// First second analysed (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_offset_sec: Option<u32>,
    /// Second after which analysis stops (default start + 120).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_offset_sec: Option<u32>,
    /// Length of each segment in seconds (default 16, at least 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_sec: Option<u32>,
}

/// A resolved `[start, end)` range with its interval, all in whole seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentRange {
    /// First second analysed.
    pub start_sec: u32,
    /// Second after which analysis stops (before clipping to the video).
    pub end_sec: u32,
    /// Segment length.
    pub interval_sec: u32,
}

impl SegmentRange {
    /// Refuses a range cut into more than
    /// [`VideoSegmentConfig::MAX_SEGMENTS`] segments when it stops at
    /// `stop_sec` (its end, or the video's length if that comes first).
    pub fn check_count(&self, stop_sec: f64) -> Result<(), EmbedError> {
        let (start, interval) = (f64::from(self.start_sec), f64::from(self.interval_sec));
        let n = ((stop_sec - start) / interval).ceil().max(0.0);
        if n > VideoSegmentConfig::MAX_SEGMENTS as f64 {
            return Err(EmbedError::invalid(
                "video.segment_config",
                format!(
                    "{n:.0} segments of {interval} s between {start} s and {stop_sec:.0} s are \
                     over the limit of {} per video: set a longer interval or a narrower \
                     start/end (a video's length is what its header says)",
                    VideoSegmentConfig::MAX_SEGMENTS
                ),
            ));
        }
        Ok(())
    }
}

/// One time interval of a video, in seconds from its start.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Segment {
    /// Inclusive start.
    pub start_sec: f64,
    /// End (exclusive, except for a last segment clipped to the video's end).
    pub end_sec: f64,
}

impl VideoSegmentConfig {
    /// Vertex's default start.
    pub const DEFAULT_START_SEC: u32 = 0;
    /// Vertex's default range length, and the most it analyses per request.
    pub const MAX_SPAN_SEC: u32 = 120;
    /// Vertex's default interval.
    pub const DEFAULT_INTERVAL_SEC: u32 = 16;
    /// The smallest interval Vertex accepts.
    pub const MIN_INTERVAL_SEC: u32 = 4;
    /// The most segments one video may be cut into: 111 hours at the
    /// smallest interval, 444 at the default. A bound, not a Vertex rule: a
    /// video's length comes from its own header, and a 4 KB file can claim
    /// to last 30 years; with `end` far out, cutting it up held 23 GB before
    /// a frame was decoded (and the Vertex client would have planned a
    /// request per 112 s of it).
    pub const MAX_SEGMENTS: u64 = 100_000;

    /// A config with all three values given, validated.
    pub fn new(
        start_offset_sec: u32,
        end_offset_sec: u32,
        interval_sec: u32,
    ) -> Result<Self, EmbedError> {
        let cfg = Self {
            start_offset_sec: Some(start_offset_sec),
            end_offset_sec: Some(end_offset_sec),
            interval_sec: Some(interval_sec),
        };
        cfg.range()?;
        Ok(cfg)
    }

    /// Fills in defaults and checks the values: interval at least 4 s,
    /// start before end.
    pub fn range(&self) -> Result<SegmentRange, EmbedError> {
        let interval = self.interval_sec.unwrap_or(Self::DEFAULT_INTERVAL_SEC);
        if interval < Self::MIN_INTERVAL_SEC {
            return Err(EmbedError::invalid(
                "video.segment_config.interval_sec",
                format!(
                    "{interval} s is below the minimum of {} s",
                    Self::MIN_INTERVAL_SEC
                ),
            ));
        }
        let (start, end) = match (self.start_offset_sec, self.end_offset_sec) {
            (None, Some(end)) => (end.saturating_sub(Self::MAX_SPAN_SEC), end),
            (start, end) => {
                let start = start.unwrap_or(Self::DEFAULT_START_SEC);
                (
                    start,
                    end.unwrap_or(start.saturating_add(Self::MAX_SPAN_SEC)),
                )
            }
        };
        if start >= end {
            return Err(EmbedError::invalid(
                "video.segment_config",
                format!("start ({start} s) must be before end ({end} s)"),
            ));
        }
        Ok(SegmentRange {
            start_sec: start,
            end_sec: end,
            interval_sec: interval,
        })
    }

    /// The segments this config gives on a video of `duration_sec` seconds.
    ///
    /// Errors when the video is empty or starts after its end; never returns
    /// an empty list.
    pub fn segments(&self, duration_sec: f64) -> Result<Vec<Segment>, EmbedError> {
        let range = self.range()?;
        if !duration_sec.is_finite() || duration_sec <= 0.0 {
            return Err(EmbedError::invalid(
                "video",
                format!("the video has no duration ({duration_sec} s)"),
            ));
        }
        let start = f64::from(range.start_sec);
        if start >= duration_sec {
            return Err(EmbedError::invalid(
                "video.segment_config.start_offset_sec",
                format!("start {start} s is at or beyond the video's end ({duration_sec:.3} s)"),
            ));
        }
        let stop = f64::from(range.end_sec).min(duration_sec);
        range.check_count(stop)?;
        let interval = f64::from(range.interval_sec);
        let mut out = Vec::new();
        let mut s = start;
        while s < stop {
            out.push(Segment {
                start_sec: s,
                end_sec: (s + interval).min(stop),
            });
            s += interval;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds(cfg: VideoSegmentConfig, dur: f64) -> Vec<(f64, f64)> {
        cfg.segments(dur)
            .unwrap()
            .into_iter()
            .map(|s| (s.start_sec, s.end_sec))
            .collect()
    }

    /// A video that claims to last a billion seconds, asked for all of it
    /// in 4 s segments, is refused before anything is allocated; a week in
    /// 16 s segments (37,800) is not.
    #[test]
    fn segment_count_is_bounded() {
        let all = VideoSegmentConfig::new(0, u32::MAX, 4).unwrap();
        let e = all.segments(1e9).unwrap_err().to_string();
        assert!(
            e.contains("250000000 segments") && e.contains("100000"),
            "{e}"
        );
        let week = 7.0 * 86_400.0;
        let cfg = VideoSegmentConfig::new(0, u32::MAX, 16).unwrap();
        assert_eq!(cfg.segments(week).unwrap().len(), 37_800);
        // The limit itself is allowed, one more is not.
        let cfg = VideoSegmentConfig::new(0, 400_000, 4).unwrap();
        assert_eq!(cfg.segments(1e9).unwrap().len(), 100_000);
        let cfg = VideoSegmentConfig::new(0, 400_001, 4).unwrap();
        assert!(cfg.segments(1e9).is_err());
    }

    #[test]
    fn documented_example_59s_interval_10() {
        let cfg = VideoSegmentConfig::new(0, 120, 10).unwrap();
        assert_eq!(
            bounds(cfg, 59.0),
            vec![
                (0.0, 10.0),
                (10.0, 20.0),
                (20.0, 30.0),
                (30.0, 40.0),
                (40.0, 50.0),
                (50.0, 59.0)
            ]
        );
    }

    #[test]
    fn defaults_are_vertex_defaults() {
        let r = VideoSegmentConfig::default().range().unwrap();
        assert_eq!(
            r,
            SegmentRange {
                start_sec: 0,
                end_sec: 120,
                interval_sec: 16
            }
        );
        // 200 s video, defaults: 0..120 in 16 s steps, last one 112..120.
        let b = bounds(VideoSegmentConfig::default(), 200.0);
        assert_eq!(b.len(), 8);
        assert_eq!(b[7], (112.0, 120.0));
    }

    #[test]
    fn only_end_given_starts_120_before_it() {
        let cfg = VideoSegmentConfig {
            end_offset_sec: Some(300),
            ..Default::default()
        };
        assert_eq!(cfg.range().unwrap().start_sec, 180);
        let cfg = VideoSegmentConfig {
            end_offset_sec: Some(50),
            ..Default::default()
        };
        assert_eq!(cfg.range().unwrap().start_sec, 0);
    }

    #[test]
    fn only_start_given_ends_120_after_it() {
        let cfg = VideoSegmentConfig {
            start_offset_sec: Some(30),
            ..Default::default()
        };
        assert_eq!(cfg.range().unwrap().end_sec, 150);
    }

    #[test]
    fn explicit_long_range_is_kept() {
        // Local backends analyse past 120 s; only Vertex windows it.
        let cfg = VideoSegmentConfig::new(0, 600, 60).unwrap();
        assert_eq!(bounds(cfg, 1000.0).len(), 10);
    }

    #[test]
    fn invalid_configs_name_the_field() {
        let e = VideoSegmentConfig::new(0, 120, 3).unwrap_err();
        assert!(e.to_string().contains("interval_sec"), "{e}");
        let e = VideoSegmentConfig::new(10, 10, 4).unwrap_err();
        assert!(e.to_string().contains("must be before end"), "{e}");
        let e = VideoSegmentConfig::new(20, 10, 4).unwrap_err();
        assert!(matches!(e, EmbedError::InvalidInput { .. }));
    }

    #[test]
    fn start_beyond_video_and_empty_video_are_errors() {
        let cfg = VideoSegmentConfig::new(60, 120, 10).unwrap();
        let e = cfg.segments(59.0).unwrap_err();
        assert!(e.to_string().contains("start_offset_sec"), "{e}");
        assert!(VideoSegmentConfig::default().segments(0.0).is_err());
        assert!(VideoSegmentConfig::default().segments(f64::NAN).is_err());
    }

    #[test]
    fn short_video_gets_one_clipped_segment() {
        assert_eq!(bounds(VideoSegmentConfig::default(), 0.2), vec![(0.0, 0.2)]);
    }

    #[test]
    fn end_not_a_multiple_of_interval_clips_last_segment() {
        let cfg = VideoSegmentConfig::new(5, 30, 10).unwrap();
        assert_eq!(
            bounds(cfg, 100.0),
            vec![(5.0, 15.0), (15.0, 25.0), (25.0, 30.0)]
        );
    }

    #[test]
    fn serde_uses_vertex_field_names() {
        let cfg = VideoSegmentConfig::new(0, 60, 8).unwrap();
        let json = serde_json::to_string(&cfg).unwrap();
        assert_eq!(
            json,
            r#"{"startOffsetSec":0,"endOffsetSec":60,"intervalSec":8}"#
        );
    }
}
