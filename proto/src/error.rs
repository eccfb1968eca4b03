//! Configuration errors: every problem found, each with the path of the field it is about.

use std::fmt;

use crate::pb;

/// One problem with one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Where, in the document's vocabulary: `apis[2].routes[0].path`.
    pub path: String,
    /// What is wrong, and what would be right.
    pub reason: String,
    /// The resource the field belongs to, when it belongs to one.
    pub resource: Option<pb::ResourceRef>,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.reason)
        } else {
            write!(f, "{}: {}", self.path, self.reason)
        }
    }
}

/// Every problem found in a configuration, in document order. Never empty.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<FieldError>);

impl ConfigErrors {
    /// A single error that belongs to no field (a syntax error, say).
    pub fn single(path: impl Into<String>, reason: impl Into<String>) -> Self {
        Self(vec![FieldError {
            path: path.into(),
            reason: reason.into(),
            resource: None,
        }])
    }

    pub fn iter(&self) -> impl Iterator<Item = &FieldError> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(
            f,
            "{n} error{} in configuration",
            if n == 1 { "" } else { "s" }
        )?;
        for error in &self.0 {
            write!(f, "\n  {error}")?;
        }
        Ok(())
    }
}
