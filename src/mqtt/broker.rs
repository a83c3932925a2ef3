//! The embedded broker (placeholder).
