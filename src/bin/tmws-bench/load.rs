//! The closed-loop load runner: `concurrency` workers call as fast as answers come back; the
//! first `warmup` is not recorded; latencies go to HDR histograms (µs, 3 significant digits).

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;

#[derive(Clone, Debug)]
pub struct Spec {
    pub concurrency: usize,
    pub duration: Duration,
    pub warmup: Duration,
    /// Stop after this many recorded calls (before `duration` if reached first).
    pub max_calls: Option<u64>,
}

/// What one call reports besides its latency.
#[derive(Default, Clone, Copy, Debug)]
pub struct Sample {
    /// Units of work done (memories written, tasks completed); 1 for an ordinary call.
    pub items: u64,
    /// Recall of this call's answer, when known.
    pub recall: Option<f64>,
    /// Nothing left to do (a drained queue): this worker stops, the call is not recorded.
    pub done: bool,
}

impl Sample {
    pub fn one() -> Self {
        Self { items: 1, ..Self::default() }
    }
    pub fn items(items: u64) -> Self {
        Self { items, ..Self::default() }
    }
    pub fn with_recall(recall: f64) -> Self {
        Self { items: 1, recall: Some(recall), done: false }
    }
    pub fn done() -> Self {
        Self { done: true, ..Self::default() }
    }
}

#[derive(Clone, Debug)]
pub struct Outcome {
    pub calls: u64,
    pub errors: u64,
    pub items: u64,
    pub secs: f64,
    pub hist: Histogram<u64>,
    pub recall_sum: f64,
    pub recall_n: u64,
    pub first_error: Option<String>,
}

impl Outcome {
    pub fn qps(&self) -> f64 {
        if self.secs > 0.0 { self.calls as f64 / self.secs } else { 0.0 }
    }
    pub fn items_per_sec(&self) -> f64 {
        if self.secs > 0.0 { self.items as f64 / self.secs } else { 0.0 }
    }
    /// Milliseconds at quantile `q`.
    pub fn ms(&self, q: f64) -> f64 {
        if self.hist.is_empty() { 0.0 } else { self.hist.value_at_quantile(q) as f64 / 1000.0 }
    }
    pub fn mean_ms(&self) -> f64 {
        if self.hist.is_empty() { 0.0 } else { self.hist.mean() / 1000.0 }
    }
    pub fn max_ms(&self) -> f64 {
        self.hist.max() as f64 / 1000.0
    }
    pub fn recall(&self) -> Option<f64> {
        (self.recall_n > 0).then(|| self.recall_sum / self.recall_n as f64)
    }
}

pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds")
}

/// Runs `call(worker, sequence)` in a closed loop on `spec.concurrency` tasks. `sequence` is
/// global and increasing (use it to pick the query).
pub async fn run<F, Fut>(spec: &Spec, call: F) -> Outcome
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Sample, String>> + Send + 'static,
{
    let call = Arc::new(call);
    let seq = Arc::new(AtomicU64::new(0));
    let recorded = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let begin = Instant::now();
    let start = begin + spec.warmup;
    let end = start + spec.duration;
    let mut handles = Vec::with_capacity(spec.concurrency);
    for w in 0..spec.concurrency {
        let call = call.clone();
        let seq = seq.clone();
        let recorded = recorded.clone();
        let stop = stop.clone();
        let max_calls = spec.max_calls;
        handles.push(tokio::spawn(async move {
            let mut hist = histogram();
            let (mut calls, mut errors, mut items) = (0u64, 0u64, 0u64);
            let (mut recall_sum, mut recall_n) = (0.0, 0u64);
            let mut first_error = None;
            let mut last = start;
            while !stop.load(Ordering::Relaxed) {
                let s = seq.fetch_add(1, Ordering::Relaxed);
                let t0 = Instant::now();
                // Every worker records at least one call, even when a slow warm-up call ran past
                // the end of the window (short --quick runs on a loaded machine).
                if t0 >= end && calls + errors > 0 {
                    break;
                }
                let result = call(w, s).await;
                let t1 = Instant::now();
                if t0 < start {
                    if matches!(result, Ok(Sample { done: true, .. })) {
                        break;
                    }
                    continue;
                }
                match result {
                    Ok(sample) if sample.done => break,
                    Ok(sample) => {
                        let _ = hist.record((t1 - t0).as_micros().max(1) as u64);
                        calls += 1;
                        items += sample.items;
                        if let Some(r) = sample.recall {
                            recall_sum += r;
                            recall_n += 1;
                        }
                    }
                    Err(e) => {
                        errors += 1;
                        if first_error.is_none() {
                            first_error = Some(e);
                        }
                    }
                }
                last = t1;
                if let Some(max) = max_calls
                    && recorded.fetch_add(1, Ordering::Relaxed) + 1 >= max
                {
                    stop.store(true, Ordering::Relaxed);
                }
            }
            (hist, calls, errors, items, recall_sum, recall_n, first_error, last)
        }));
    }
    let mut out = Outcome {
        calls: 0,
        errors: 0,
        items: 0,
        secs: 0.0,
        hist: histogram(),
        recall_sum: 0.0,
        recall_n: 0,
        first_error: None,
    };
    let mut last = start;
    for h in handles {
        let Ok((hist, calls, errors, items, rs, rn, fe, l)) = h.await else {
            out.errors += 1;
            continue;
        };
        let _ = out.hist.add(&hist);
        out.calls += calls;
        out.errors += errors;
        out.items += items;
        out.recall_sum += rs;
        out.recall_n += rn;
        if out.first_error.is_none() {
            out.first_error = fe;
        }
        last = last.max(l);
    }
    out.secs = last.saturating_duration_since(start).as_secs_f64();
    out
}
