//! Typed, key-named access to GGUF metadata, so a missing or mistyped key says which key.

use std::collections::HashMap;

use anyhow::{anyhow, bail, Result};
use candle_core::quantized::gguf_file::Value;

pub(crate) struct Metadata<'a> {
    map: &'a HashMap<String, Value>,
}

impl<'a> Metadata<'a> {
    pub fn new(map: &'a HashMap<String, Value>) -> Self {
        Self { map }
    }

    pub fn keys(&self) -> impl Iterator<Item = &'a String> {
        self.map.keys()
    }

    fn required(&self, key: &str) -> Result<&'a Value> {
        self.map
            .get(key)
            .ok_or_else(|| anyhow!("GGUF metadata lacks {key}"))
    }

    /// Writers differ in the integer width they use for the same key, so accept any
    /// non-negative integer.
    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        let Some(value) = self.map.get(key) else {
            return Ok(None);
        };
        let v = match value {
            Value::U8(v) => *v as u64,
            Value::U16(v) => *v as u64,
            Value::U32(v) => *v as u64,
            Value::U64(v) => *v,
            Value::I8(v) if *v >= 0 => *v as u64,
            Value::I16(v) if *v >= 0 => *v as u64,
            Value::I32(v) if *v >= 0 => *v as u64,
            Value::I64(v) if *v >= 0 => *v as u64,
            other => bail!("GGUF key {key}: expected a non-negative integer, got {other:?}"),
        };
        Ok(Some(v))
    }

    pub fn opt_u32(&self, key: &str) -> Result<Option<u32>> {
        self.opt_u64(key)?
            .map(|v| u32::try_from(v).map_err(|_| anyhow!("GGUF key {key}: {v} overflows u32")))
            .transpose()
    }

    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        Ok(self.opt_u64(key)?.map(|v| v as usize))
    }

    pub fn usize(&self, key: &str) -> Result<usize> {
        self.required(key)?;
        Ok(self.opt_usize(key)?.expect("presence checked above"))
    }

    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        let Some(value) = self.map.get(key) else {
            return Ok(None);
        };
        match value {
            // Widening 1e-5f32 directly gives 9.999999747378752e-6; going through the
            // shortest f32 decimal recovers the value the model's authors wrote.
            Value::F32(v) => Ok(Some(v.to_string().parse::<f64>().unwrap_or(*v as f64))),
            Value::F64(v) => Ok(Some(*v)),
            other => bail!("GGUF key {key}: expected a float, got {other:?}"),
        }
    }

    pub fn f64(&self, key: &str) -> Result<f64> {
        self.required(key)?;
        Ok(self.opt_f64(key)?.expect("presence checked above"))
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::Bool(v)) => Ok(Some(*v)),
            Some(other) => bail!("GGUF key {key}: expected a bool, got {other:?}"),
        }
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<&'a str>> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(other) => bail!(
                "GGUF key {key}: expected a string, got {:?}",
                other.value_type()
            ),
        }
    }

    pub fn str(&self, key: &str) -> Result<&'a str> {
        self.required(key)?;
        Ok(self.opt_str(key)?.expect("presence checked above"))
    }

    fn opt_array(&self, key: &str) -> Result<Option<&'a Vec<Value>>> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => Ok(Some(items)),
            Some(other) => bail!(
                "GGUF key {key}: expected an array, got {:?}",
                other.value_type()
            ),
        }
    }

    pub fn opt_str_array(&self, key: &str) -> Result<Option<Vec<String>>> {
        let Some(items) = self.opt_array(key)? else {
            return Ok(None);
        };
        items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                other => bail!(
                    "GGUF key {key}: expected strings, got {:?}",
                    other.value_type()
                ),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    pub fn opt_i32_array(&self, key: &str) -> Result<Option<Vec<i32>>> {
        let Some(items) = self.opt_array(key)? else {
            return Ok(None);
        };
        items
            .iter()
            .map(|v| match v {
                Value::I32(x) => Ok(*x),
                Value::U32(x) => {
                    i32::try_from(*x).map_err(|_| anyhow!("GGUF key {key}: {x} overflows i32"))
                }
                other => bail!(
                    "GGUF key {key}: expected integers, got {:?}",
                    other.value_type()
                ),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
}
