//! Helpers shared by integration tests. Each helper lives in its own, distinctly named file.

pub mod netns;
pub mod packets;
