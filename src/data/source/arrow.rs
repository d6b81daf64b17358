//! Parquet and Arrow IPC files, their values as JSON.

use super::Record;
use anyhow::{anyhow, Result};
use arrow2::array::{
    Array, BooleanArray, DictionaryArray, DictionaryKey, FixedSizeListArray, ListArray, PrimitiveArray,
    StructArray, Utf8Array,
};
use arrow2::chunk::Chunk;
use arrow2::datatypes::{DataType, IntegerType, Schema};
use arrow2::offset::Offset;
use arrow2::types::{f16, NativeType};
use serde_json::{Map, Number, Value};
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

thread_local! {
    /// Set while this thread runs a [`guarded`] reader, whose panics become errors.
    static QUIET_PANICS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs a reader of binary data, turning a panic of the Arrow/Parquet decoder on malformed
/// input into an error. The first call installs a panic hook that stays silent for panics
/// inside such a reader (they are reported as errors) and defers to the previous hook for
/// every other panic.
pub(super) fn guarded(
    path: &Path,
    kind: &str,
    read: impl FnOnce() -> Result<Vec<Record>>,
) -> Result<Vec<Record>> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET_PANICS.with(std::cell::Cell::get) {
                previous(info)
            }
        }));
    });
    QUIET_PANICS.with(|q| q.set(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(read));
    QUIET_PANICS.with(|q| q.set(false));
    result.unwrap_or_else(|payload| {
        let detail = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "its contents are inconsistent".to_string());
        Err(anyhow!(
            "data file {} is a corrupt {kind} file (the decoder failed: {detail}); write it \
             again",
            path.display()
        ))
    })
}

fn open(path: &Path) -> Result<BufReader<File>> {
    File::open(path).map(BufReader::new).map_err(|e| {
        anyhow!("cannot read data file {}: {e}; check the path and its permissions", path.display())
    })
}

fn corrupt(path: &Path, kind: &str, e: impl std::fmt::Display) -> anyhow::Error {
    let detail = e.to_string();
    if let Some(view) = view_type(&detail) {
        return anyhow!(
            "data file {} has a column of Arrow's view type {view}, which lorafit's Arrow reader does not \
             read; convert it before writing, e.g. in pyarrow `table = table.set_column(i, name, \
             table[name].cast(pa.string()))` (`pa.binary()` for binary_view, `pa.list_(type)` for list_view), \
             or save the table as Parquet, which stores string_view as a plain string",
            path.display()
        );
    }
    anyhow!(
        "data file {} is not readable as {kind} ({detail}); it is corrupt or truncated, so write \
         it again",
        path.display()
    )
}

/// The view type (Arrow 1.4's string_view, binary_view, list_view) an Arrow schema decoder
/// failed on: arrow2 predates them and reports their type tags as an unknown union variant.
fn view_type(decoder_error: &str) -> Option<&'static str> {
    // The tags of Arrow's `Type` union in Schema.fbs.
    const VIEWS: [(&str, &str); 4] =
        [("23", "binary_view"), ("24", "string_view"), ("25", "list_view"), ("26", "large_list_view")];
    let tag = decoder_error.split("Unknown union (tag = ").nth(1)?.split(')').next()?;
    VIEWS.iter().find(|(t, _)| *t == tag).map(|(_, name)| *name)
}

pub(super) fn read_parquet(path: &Path) -> Result<Vec<Record>> {
    use arrow2::io::parquet::read;
    let mut reader = open(path)?;
    let mut metadata = read::read_metadata(&mut reader).map_err(|e| corrupt(path, "a Parquet file", e))?;
    let schema = match read::infer_schema(&metadata) {
        Ok(schema) => schema,
        // The Arrow schema pyarrow embeds only refines the Parquet one (e.g. string_view for a
        // string column); when arrow2 cannot decode it, the Parquet schema alone gives the values.
        Err(_) if has_arrow_schema(&metadata) => {
            metadata
                .key_value_metadata
                .as_mut()
                .into_iter()
                .for_each(|kv| kv.retain(|kv| kv.key != ARROW_SCHEMA));
            read::infer_schema(&metadata).map_err(|e| corrupt(path, "a Parquet file", e))?
        }
        Err(e) => return Err(corrupt(path, "a Parquet file", e)),
    };
    let expected = metadata.num_rows;
    let chunks = read::FileReader::new(reader, metadata.row_groups, schema.clone(), None, None, None);
    let mut records = Vec::new();
    for chunk in chunks {
        let chunk = chunk.map_err(|e| corrupt(path, "a Parquet file", e))?;
        append_chunk(path, &schema, &chunk, &mut records)?;
    }
    if records.len() != expected {
        return Err(corrupt(
            path,
            "a Parquet file",
            format!("its footer promises {expected} rows, its pages hold {}", records.len()),
        ));
    }
    Ok(records)
}

/// The key under which Parquet writers store the Arrow schema of the table.
const ARROW_SCHEMA: &str = "ARROW:schema";

fn has_arrow_schema(metadata: &arrow2::io::parquet::read::FileMetaData) -> bool {
    metadata.key_value_metadata.as_ref().is_some_and(|kv| kv.iter().any(|kv| kv.key == ARROW_SCHEMA))
}

pub(super) fn read_ipc_file(path: &Path) -> Result<Vec<Record>> {
    use arrow2::io::ipc::read;
    let mut reader = open(path)?;
    let metadata =
        read::read_file_metadata(&mut reader).map_err(|e| corrupt(path, "an Arrow IPC file", e))?;
    let schema = metadata.schema.clone();
    let mut records = Vec::new();
    for chunk in read::FileReader::new(reader, metadata, None, None) {
        let chunk = chunk.map_err(|e| corrupt(path, "an Arrow IPC file", e))?;
        append_chunk(path, &schema, &chunk, &mut records)?;
    }
    Ok(records)
}

pub(super) fn read_ipc_stream(path: &Path) -> Result<Vec<Record>> {
    use arrow2::io::ipc::read;
    let mut reader = open(path)?;
    let metadata =
        read::read_stream_metadata(&mut reader).map_err(|e| corrupt(path, "an Arrow IPC stream", e))?;
    let schema = metadata.schema.clone();
    let mut records = Vec::new();
    for state in read::StreamReader::new(reader, metadata, None) {
        match state.map_err(|e| corrupt(path, "an Arrow IPC stream", e))? {
            read::StreamState::Some(chunk) => append_chunk(path, &schema, &chunk, &mut records)?,
            // The file ended without the end-of-stream marker, which the format allows.
            read::StreamState::Waiting => break,
        }
    }
    Ok(records)
}

/// Appends one record per row of `chunk`, numbering rows on from those already read.
fn append_chunk(
    path: &Path,
    schema: &Schema,
    chunk: &Chunk<Box<dyn Array>>,
    records: &mut Vec<Record>,
) -> Result<()> {
    let mut columns = Vec::with_capacity(chunk.arrays().len());
    for (field, array) in schema.fields.iter().zip(chunk.arrays()) {
        let values = to_values(array.as_ref(), &field.name)
            .map_err(|e| anyhow!("data file {}: {e}", path.display()))?;
        columns.push((field.name.as_str(), values));
    }
    for i in 0..chunk.len() {
        let mut fields = Map::new();
        for (name, values) in columns.iter_mut() {
            let value = values.get_mut(i).map(std::mem::take).unwrap_or(Value::Null);
            fields.insert((*name).to_string(), value);
        }
        let row = records.len() + 1;
        records.push(Record { file: path.to_path_buf(), row, fields });
    }
    Ok(())
}

/// The JSON value of every slot of `array`; `column` names it (with `[]` / `.field` for nested
/// values) in errors.
fn to_values(array: &dyn Array, column: &str) -> std::result::Result<Vec<Value>, String> {
    use DataType as D;
    let values = match array.data_type().to_logical_type() {
        D::Null => vec![Value::Null; array.len()],
        D::Boolean => downcast::<BooleanArray>(array, column)?
            .iter()
            .map(|v| v.map_or(Value::Null, Value::Bool))
            .collect(),
        D::Int8 => primitive::<i8>(array, column, Value::from)?,
        D::Int16 => primitive::<i16>(array, column, Value::from)?,
        D::Int32 => primitive::<i32>(array, column, Value::from)?,
        D::Int64 => primitive::<i64>(array, column, Value::from)?,
        D::UInt8 => primitive::<u8>(array, column, Value::from)?,
        D::UInt16 => primitive::<u16>(array, column, Value::from)?,
        D::UInt32 => primitive::<u32>(array, column, Value::from)?,
        D::UInt64 => primitive::<u64>(array, column, Value::from)?,
        D::Float16 => primitive::<f16>(array, column, |v| float(v.to_f32().into()))?,
        D::Float32 => primitive::<f32>(array, column, |v| float(v.into()))?,
        D::Float64 => primitive::<f64>(array, column, float)?,
        D::Utf8 => strings::<i32>(array, column)?,
        D::LargeUtf8 => strings::<i64>(array, column)?,
        D::List(_) => list::<i32>(array, column)?,
        D::LargeList(_) => list::<i64>(array, column)?,
        D::FixedSizeList(_, _) => fixed_size_list(array, column)?,
        D::Struct(_) => structs(array, column)?,
        D::Dictionary(key, _, _) => match key {
            IntegerType::Int8 => dictionary::<i8>(array, column)?,
            IntegerType::Int16 => dictionary::<i16>(array, column)?,
            IntegerType::Int32 => dictionary::<i32>(array, column)?,
            IntegerType::Int64 => dictionary::<i64>(array, column)?,
            IntegerType::UInt8 => dictionary::<u8>(array, column)?,
            IntegerType::UInt16 => dictionary::<u16>(array, column)?,
            IntegerType::UInt32 => dictionary::<u32>(array, column)?,
            IntegerType::UInt64 => dictionary::<u64>(array, column)?,
        },
        other => {
            return Err(format!(
                "column `{column}` has Arrow type {other:?}, which has no JSON form lorafit can \
                 use; drop or convert that column before saving (e.g. `dataset.remove_columns` \
                 or `dataset.cast_column` to a string)"
            ))
        }
    };
    if values.len() != array.len() {
        return Err(format!(
            "column `{column}` is inconsistent ({} values for {} rows); the file is corrupt, so \
             write it again",
            values.len(),
            array.len()
        ));
    }
    Ok(values)
}

fn downcast<'a, A: 'static>(array: &'a dyn Array, column: &str) -> std::result::Result<&'a A, String> {
    array.as_any().downcast_ref::<A>().ok_or_else(|| {
        format!(
            "column `{column}` holds an unexpected array for its type {:?}; the file is corrupt",
            array.data_type()
        )
    })
}

fn float(v: f64) -> Value {
    Number::from_f64(v).map_or(Value::Null, Value::Number)
}

fn primitive<T: NativeType>(
    array: &dyn Array,
    column: &str,
    convert: impl Fn(T) -> Value,
) -> std::result::Result<Vec<Value>, String> {
    Ok(downcast::<PrimitiveArray<T>>(array, column)?
        .iter()
        .map(|v| v.map_or(Value::Null, |v| convert(*v)))
        .collect())
}

fn strings<O: Offset>(array: &dyn Array, column: &str) -> std::result::Result<Vec<Value>, String> {
    Ok(downcast::<Utf8Array<O>>(array, column)?
        .iter()
        .map(|v| v.map_or(Value::Null, |s| Value::String(s.to_string())))
        .collect())
}

fn list<O: Offset>(array: &dyn Array, column: &str) -> std::result::Result<Vec<Value>, String> {
    let list = downcast::<ListArray<O>>(array, column)?;
    let mut items = to_values(list.values().as_ref(), &format!("{column}[]"))?;
    let offsets = list.offsets();
    let mut out = Vec::with_capacity(list.len());
    for i in 0..list.len() {
        if list.is_null(i) || i >= offsets.len_proxy() {
            out.push(Value::Null);
            continue;
        }
        let (start, end) = offsets.start_end(i);
        let slice = items.get_mut(start..end).ok_or_else(|| {
            format!("column `{column}` has list offsets past its values; the file is corrupt")
        })?;
        out.push(Value::Array(slice.iter_mut().map(std::mem::take).collect()));
    }
    Ok(out)
}

fn fixed_size_list(array: &dyn Array, column: &str) -> std::result::Result<Vec<Value>, String> {
    let list = downcast::<FixedSizeListArray>(array, column)?;
    let size = list.size();
    let mut items = to_values(list.values().as_ref(), &format!("{column}[]"))?;
    let mut out = Vec::with_capacity(list.len());
    for i in 0..list.len() {
        if list.is_null(i) {
            out.push(Value::Null);
            continue;
        }
        let slice = items.get_mut(i * size..(i + 1) * size).ok_or_else(|| {
            format!("column `{column}` has fewer values than its rows need; the file is corrupt")
        })?;
        out.push(Value::Array(slice.iter_mut().map(std::mem::take).collect()));
    }
    Ok(out)
}

fn structs(array: &dyn Array, column: &str) -> std::result::Result<Vec<Value>, String> {
    let array = downcast::<StructArray>(array, column)?;
    let mut children = Vec::with_capacity(array.fields().len());
    for (field, child) in array.fields().iter().zip(array.values()) {
        let values = to_values(child.as_ref(), &format!("{column}.{}", field.name))?;
        children.push((field.name.as_str(), values));
    }
    let mut out = Vec::with_capacity(array.len());
    for i in 0..array.len() {
        if array.is_null(i) {
            out.push(Value::Null);
            continue;
        }
        let mut object = Map::new();
        for (name, values) in children.iter_mut() {
            let value = values.get_mut(i).map(std::mem::take).unwrap_or(Value::Null);
            object.insert((*name).to_string(), value);
        }
        out.push(Value::Object(object));
    }
    Ok(out)
}

fn dictionary<K: DictionaryKey>(array: &dyn Array, column: &str) -> std::result::Result<Vec<Value>, String> {
    let array = downcast::<DictionaryArray<K>>(array, column)?;
    let values = to_values(array.values().as_ref(), column)?;
    array
        .keys()
        .iter()
        .map(|key| match key {
            None => Ok(Value::Null),
            Some(key) => {
                (*key).try_into().ok().and_then(|k: usize| values.get(k).cloned()).ok_or_else(|| {
                    format!("column `{column}` has a dictionary key out of range; the file is corrupt")
                })
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrow_values_become_json() {
        use arrow2::array::{Int32Array, MutableDictionaryArray, MutableUtf8Array, TryExtend};
        let ints = Int32Array::from([Some(1), None, Some(3)]);
        assert_eq!(to_values(&ints, "n").unwrap(), [Value::from(1), Value::Null, Value::from(3)]);
        let mut dict = MutableDictionaryArray::<i32, MutableUtf8Array<i32>>::new();
        dict.try_extend([Some("a"), None, Some("a"), Some("b")]).unwrap();
        let dict: DictionaryArray<i32> = dict.into();
        assert_eq!(
            to_values(&dict, "d").unwrap(),
            [Value::from("a"), Value::Null, Value::from("a"), Value::from("b")]
        );
        let floats = PrimitiveArray::<f64>::from([Some(0.5), Some(f64::NAN)]);
        assert_eq!(to_values(&floats, "f").unwrap(), [Value::from(0.5), Value::Null]);
        let binary = arrow2::array::BinaryArray::<i32>::from_slice([b"x"]);
        let err = to_values(&binary, "img").unwrap_err();
        assert!(err.contains("`img`") && err.contains("Binary"), "{err}");
    }
}
