//! In-memory copy of the stored vectors for exact search. (Placeholder.)

#[derive(Default)]
pub struct VectorIndex {}
