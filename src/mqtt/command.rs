//! Commands from MES (placeholder).
