//! Sinusoid regression tasks (Finn et al., 2017): `y = A sin(x - φ)` with amplitude `A`, phase
//! `φ` and inputs `x` drawn uniformly from configurable ranges.

use candle_core::{Device, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::tasks::{Split, Task, TaskKind, TaskSource};

/// Configuration of the sinusoid task distribution.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinusoidTasks {
    /// Amplitude range `[min, max]` (paper: 0.1 to 5).
    #[serde(default = "amplitude")]
    pub amplitude: [f64; 2],
    /// Phase range `[min, max]` (paper: 0 to π).
    #[serde(default = "phase")]
    pub phase: [f64; 2],
    /// Input range `[min, max]` (paper: -5 to 5).
    #[serde(default = "x_range")]
    pub x_range: [f64; 2],
    /// Support points per task (K).
    #[serde(default = "ten")]
    pub support: usize,
    /// Query points per task.
    #[serde(default = "ten")]
    pub query: usize,
    /// Test tasks score `test_grid` evenly spaced query points over the input range instead of
    /// `query` random ones (the MAML paper's evaluation protocol); `None` keeps random points.
    #[serde(default = "default_grid")]
    pub test_grid: Option<usize>,
}

fn default_grid() -> Option<usize> {
    Some(100)
}

fn amplitude() -> [f64; 2] {
    [0.1, 5.0]
}
fn phase() -> [f64; 2] {
    [0.0, std::f64::consts::PI]
}
fn x_range() -> [f64; 2] {
    [-5.0, 5.0]
}
fn ten() -> usize {
    10
}

impl Default for SinusoidTasks {
    fn default() -> Self {
        Self {
            amplitude: amplitude(),
            phase: phase(),
            x_range: x_range(),
            support: 10,
            query: 10,
            test_grid: default_grid(),
        }
    }
}

/// One sinusoid: amplitude and phase.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sinusoid {
    /// Amplitude A.
    pub amplitude: f64,
    /// Phase φ.
    pub phase: f64,
}

impl Sinusoid {
    /// `A sin(x - φ)`.
    pub fn eval(&self, x: f64) -> f64 {
        self.amplitude * (x - self.phase).sin()
    }
}

impl SinusoidTasks {
    /// Checks that every range is ordered and sizes are positive.
    pub fn validate(&self) -> Result<()> {
        for (name, [lo, hi]) in [
            ("amplitude", self.amplitude),
            ("phase", self.phase),
            ("x_range", self.x_range),
        ] {
            if !(lo.is_finite() && hi.is_finite() && lo <= hi) {
                return Err(Error::Config(format!(
                    "sinusoid `{name}` must be [min, max] with min <= max, got [{lo}, {hi}]"
                )));
            }
        }
        if self.support == 0 || self.query == 0 || self.test_grid == Some(0) {
            return Err(Error::Config(
                "sinusoid `support`, `query` and `test_grid` must be >= 1".into(),
            ));
        }
        Ok(())
    }

    /// Draws a sinusoid.
    pub fn draw_function(&self, rng: &mut ChaCha8Rng) -> Sinusoid {
        Sinusoid {
            amplitude: uniform(rng, self.amplitude),
            phase: uniform(rng, self.phase),
        }
    }

    /// Draws `n` points of `f` as `([n, 1], [n, 1])` f32 tensors.
    pub fn draw_points(
        &self,
        f: &Sinusoid,
        n: usize,
        rng: &mut ChaCha8Rng,
    ) -> Result<(Tensor, Tensor)> {
        let xs: Vec<f32> = (0..n).map(|_| uniform(rng, self.x_range) as f32).collect();
        points(f, &xs)
    }

    /// A task whose query set is `grid` evenly spaced points over the input range (the
    /// evaluation protocol of the MAML paper's figures and of the reference scripts).
    pub fn sample_with_grid(&self, grid: usize, rng: &mut ChaCha8Rng) -> Result<(Task, Sinusoid)> {
        let f = self.draw_function(rng);
        let support = self.draw_points(&f, self.support, rng)?;
        let [lo, hi] = self.x_range;
        let xs: Vec<f32> = (0..grid)
            .map(|i| (lo + (hi - lo) * i as f64 / (grid.max(2) - 1) as f64) as f32)
            .collect();
        let query = points(&f, &xs)?;
        Ok((Task { support, query }, f))
    }
}

/// `(x, f(x))` as `[n, 1]` tensors.
pub fn points(f: &Sinusoid, xs: &[f32]) -> Result<(Tensor, Tensor)> {
    let ys: Vec<f32> = xs.iter().map(|&x| f.eval(x as f64) as f32).collect();
    Ok((
        Tensor::from_slice(xs, (xs.len(), 1), &Device::Cpu)?,
        Tensor::from_vec(ys, (xs.len(), 1), &Device::Cpu)?,
    ))
}

fn uniform(rng: &mut ChaCha8Rng, [lo, hi]: [f64; 2]) -> f64 {
    if hi > lo {
        rng.gen_range(lo..hi)
    } else {
        lo
    }
}

impl TaskSource for SinusoidTasks {
    fn sample(&self, split: Split, rng: &mut ChaCha8Rng) -> Result<Task> {
        if let (Split::Test, Some(grid)) = (split, self.test_grid) {
            return Ok(self.sample_with_grid(grid, rng)?.0);
        }
        let f = self.draw_function(rng);
        Ok(Task {
            support: self.draw_points(&f, self.support, rng)?,
            query: self.draw_points(&f, self.query, rng)?,
        })
    }
    fn kind(&self) -> TaskKind {
        TaskKind::Regression
    }
    fn joint_batch(&self, tasks: usize, rng: &mut ChaCha8Rng) -> Result<(Tensor, Tensor, usize)> {
        let (mut xs, mut ys) = (Vec::new(), Vec::new());
        for _ in 0..tasks.max(1) {
            let f = self.draw_function(rng);
            let (x, y) = self.draw_points(&f, self.support + self.query, rng)?;
            xs.push(x);
            ys.push(y);
        }
        Ok((Tensor::cat(&xs, 0)?, Tensor::cat(&ys, 0)?, 0))
    }
    fn input_shape(&self) -> Vec<usize> {
        vec![1]
    }
}
