//! The JSON body format: the record document of `Record::to_json`, one per message.

use super::{EncodeError, Encoder};
use crate::record::Record;

/// Encodes records as compact JSON.
#[derive(Debug, Default, Clone, Copy)]
pub struct JsonEncoder;

impl Encoder for JsonEncoder {
    fn content_type(&self) -> &str {
        "application/json"
    }

    fn encode(&self, record: &Record) -> Result<Vec<u8>, EncodeError> {
        serde_json::to_vec(record).map_err(|e| EncodeError {
            id: record.id.clone(),
            message: e.to_string(),
        })
    }
}
