//! When and where each job of a build ran, for `--result` and `--trace`.

use std::time::{Duration, Instant};

use super::outcome::Span;
use super::plan::{Plan, LANES};

/// When and where each job of a build ran, for `--result` and `--trace`: a lane is
/// a slot of the pool (`local N`, `transfer N`, `remote N`), or the worker that
/// accepted a remote execution.
pub(super) struct Spans {
    pub(super) t0: Instant,
    pub(super) began: Vec<Option<Duration>>,
    pub(super) ended: Vec<Option<Duration>>,
    pub(super) lane: Vec<Option<String>>,
    pub(super) kind: Vec<&'static str>,
    /// Slots of each lane in use, and the lane and slot of each running job.
    pub(super) busy: [Vec<bool>; LANES],
    pub(super) slot: Vec<(usize, usize)>,
    /// The jobs running now.
    pub(super) active: Vec<usize>,
}

impl Spans {
    pub(super) fn new(n: usize) -> Spans {
        Spans {
            t0: Instant::now(),
            began: vec![None; n],
            ended: vec![None; n],
            lane: vec![None; n],
            kind: vec![""; n],
            busy: Default::default(),
            slot: vec![(0, 0); n],
            active: Vec::new(),
        }
    }

    pub(super) fn begin(&mut self, i: usize, plan: Plan) {
        let lane_index = plan.lane();
        let busy = &mut self.busy[lane_index];
        let slot = busy.iter().position(|b| !b).unwrap_or(busy.len());
        if slot == busy.len() {
            busy.push(true);
        } else {
            busy[slot] = true;
        }
        self.slot[i] = (lane_index, slot);
        let (kind, lane) = match plan {
            Plan::Execute => ("execute", "local"),
            Plan::Remote => ("remote", "remote"),
            Plan::Download => ("download", "transfer"),
            _ => ("upload", "transfer"),
        };
        self.kind[i] = kind;
        self.lane[i] = Some(format!("{lane} {slot}"));
        self.began[i] = Some(self.t0.elapsed());
        self.active.push(i);
    }

    pub(super) fn end(&mut self, i: usize) {
        self.ended[i] = Some(self.t0.elapsed());
        self.active.retain(|&a| a != i);
        let (lane, slot) = self.slot[i];
        if let Some(b) = self.busy[lane].get_mut(slot) {
            *b = false;
        }
    }

    /// The spans of the jobs that ran.
    pub(super) fn finished(self) -> Vec<Option<Span>> {
        (0..self.began.len())
            .map(|i| {
                Some(Span {
                    start: self.began[i]?,
                    end: self.ended[i]?,
                    lane: self.lane[i].clone()?,
                    kind: self.kind[i],
                })
            })
            .collect()
    }
}
