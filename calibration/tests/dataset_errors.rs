//! Dataset reading and the stream rule on small parquet files written here: every failure a user
//! can cause is an error that names the file (and the column or row), never a panic.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use calibration::{build, Error, Recipe, RowTokenizer, DEFAULT_TEMPLATE};
use parquet::data_type::{ByteArray, ByteArrayType, Int32Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;

fn tokenizer() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/moe-s/tokenizer.json")
}

/// One column of a test file: its schema line and its values (`None` = null).
enum Col<'a> {
    Str(&'a str, Vec<Option<&'a str>>),
    Bytes(&'a str, Vec<&'a str>),
    Int(&'a str, Vec<i32>),
}

/// Writes a one-row-group parquet file with the given columns.
fn write_parquet(path: &Path, cols: &[Col]) {
    let fields: Vec<String> = cols
        .iter()
        .map(|c| match c {
            Col::Str(name, _) => format!("OPTIONAL BYTE_ARRAY {name} (UTF8);"),
            Col::Bytes(name, _) => format!("REQUIRED BYTE_ARRAY {name};"),
            Col::Int(name, _) => format!("REQUIRED INT32 {name};"),
        })
        .collect();
    let schema = Arc::new(
        parse_message_type(&format!("message schema {{ {} }}", fields.join(" "))).unwrap(),
    );
    let props = Arc::new(WriterProperties::builder().build());
    let mut writer = SerializedFileWriter::new(File::create(path).unwrap(), schema, props).unwrap();
    let mut group = writer.next_row_group().unwrap();
    let mut i = 0;
    while let Some(mut col) = group.next_column().unwrap() {
        match &cols[i] {
            Col::Str(_, values) => {
                let present: Vec<ByteArray> = values
                    .iter()
                    .flatten()
                    .map(|s| ByteArray::from(*s))
                    .collect();
                let def: Vec<i16> = values.iter().map(|v| i16::from(v.is_some())).collect();
                col.typed::<ByteArrayType>()
                    .write_batch(&present, Some(&def), None)
                    .unwrap();
            }
            Col::Bytes(_, values) => {
                let values: Vec<ByteArray> = values.iter().map(|s| ByteArray::from(*s)).collect();
                col.typed::<ByteArrayType>()
                    .write_batch(&values, None, None)
                    .unwrap();
            }
            Col::Int(_, values) => {
                col.typed::<Int32Type>()
                    .write_batch(values, None, None)
                    .unwrap();
            }
        }
        col.close().unwrap();
        i += 1;
    }
    group.close().unwrap();
    writer.close().unwrap();
}

/// The five Open Instruct columns, `rows` rows, with row-numbered text.
fn open_instruct_cols(rows: usize) -> Vec<(&'static str, Vec<String>)> {
    calibration::COLUMNS
        .iter()
        .map(|&c| (c, (0..rows).map(|r| format!("{c} {r}")).collect()))
        .collect()
}

fn write_open_instruct(path: &Path, cols: &[(&str, Vec<String>)]) {
    let cols: Vec<Col> = cols
        .iter()
        .map(|(name, values)| Col::Str(name, values.iter().map(|v| Some(v.as_str())).collect()))
        .collect();
    write_parquet(path, &cols);
}

fn small_recipe(template: &str, nsamples: usize, seqlen: usize) -> Recipe {
    Recipe {
        template: template.to_string(),
        nsamples,
        seqlen,
        seed: 0,
    }
}

fn build_err(path: &Path, recipe: &Recipe) -> (Error, String) {
    let err = build(path, &tokenizer(), recipe).expect_err("build should fail");
    let msg = err.to_string();
    (err, msg)
}

#[test]
fn missing_column_names_file_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-task.parquet");
    let mut cols = open_instruct_cols(3);
    cols.retain(|(name, _)| *name != "task_name");
    write_open_instruct(&path, &cols);
    let (err, msg) = build_err(&path, &small_recipe(DEFAULT_TEMPLATE, 1, 2));
    assert!(
        matches!(err, Error::MissingColumn { ref column, .. } if column == "task_name"),
        "{msg}"
    );
    assert!(
        msg.contains("no-task.parquet") && msg.contains("`task_name`"),
        "{msg}"
    );
}

#[test]
fn non_string_columns_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let strings = |n: &'static str| Col::Str(n, vec![Some("a")]);
    let int_path = dir.path().join("int.parquet");
    write_parquet(
        &int_path,
        &[
            strings("instruction"),
            strings("alpaca_prompt"),
            Col::Int("response", vec![7]),
            strings("source"),
            strings("task_name"),
        ],
    );
    let (err, msg) = build_err(&int_path, &small_recipe(DEFAULT_TEMPLATE, 1, 2));
    assert!(
        matches!(err, Error::NotStringColumn { ref column, .. } if column == "response"),
        "{msg}"
    );
    assert!(
        msg.contains("int.parquet") && msg.contains("INT32"),
        "{msg}"
    );

    // Raw bytes without the UTF-8 annotation are not text either.
    let bytes_path = dir.path().join("bytes.parquet");
    write_parquet(
        &bytes_path,
        &[
            strings("instruction"),
            strings("alpaca_prompt"),
            strings("response"),
            Col::Bytes("source", vec!["x"]),
            strings("task_name"),
        ],
    );
    let (err, msg) = build_err(&bytes_path, &small_recipe(DEFAULT_TEMPLATE, 1, 2));
    assert!(
        matches!(err, Error::NotStringColumn { ref column, .. } if column == "source"),
        "{msg}"
    );
}

#[test]
fn empty_and_non_parquet_files_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.parquet");
    std::fs::write(&empty, b"").unwrap();
    let (err, msg) = build_err(&empty, &Recipe::default());
    assert!(
        matches!(err, Error::EmptyDataset { .. })
            && msg.contains("empty.parquet")
            && msg.contains("0 bytes"),
        "{msg}"
    );

    let no_rows = dir.path().join("no-rows.parquet");
    write_open_instruct(&no_rows, &open_instruct_cols(0));
    let (err, msg) = build_err(&no_rows, &Recipe::default());
    assert!(
        matches!(err, Error::EmptyDataset { .. }) && msg.contains("no rows"),
        "{msg}"
    );

    let text = dir.path().join("notes.parquet");
    std::fs::write(&text, "instruction,response\nhello,world\n").unwrap();
    let (err, msg) = build_err(&text, &Recipe::default());
    assert!(
        matches!(err, Error::NotParquet { .. }) && msg.contains("notes.parquet"),
        "{msg}"
    );

    let (err, msg) = build_err(&dir.path().join("absent.parquet"), &Recipe::default());
    assert!(
        matches!(err, Error::Io { .. }) && msg.contains("absent.parquet"),
        "{msg}"
    );
}

#[test]
fn null_in_a_template_column_names_the_row() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nulls.parquet");
    let s = |n: &'static str| Col::Str(n, vec![Some("a"), Some("b"), Some("c")]);
    write_parquet(
        &path,
        &[
            s("instruction"),
            s("alpaca_prompt"),
            Col::Str("response", vec![Some("x"), None, Some("z")]),
            s("source"),
            s("task_name"),
        ],
    );
    let (err, msg) = build_err(&path, &small_recipe(DEFAULT_TEMPLATE, 1, 2));
    assert!(
        matches!(err, Error::NullValue { row: 1, ref column, .. } if column == "response"),
        "{msg}"
    );
    // A template that does not read the column does not see the null.
    let set = build(&path, &tokenizer(), &small_recipe("{instruction}", 1, 2)).unwrap();
    assert_eq!(set.meta.rows_read, 3);
}

#[test]
fn short_stream_says_found_and_needed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.parquet");
    write_open_instruct(&path, &open_instruct_cols(2));
    let tok = RowTokenizer::from_file(&tokenizer()).unwrap();
    let expected: usize = (0..2)
        .map(|r| {
            tok.encode_row(&format!("[INST] instruction {r} [/INST] response {r}"))
                .unwrap()
                .len()
        })
        .sum();
    let (err, msg) = build_err(&path, &small_recipe(DEFAULT_TEMPLATE, 4, 512));
    assert!(
        matches!(err, Error::StreamTooShort { found, needed: 513, rows: 2, .. } if found == expected),
        "{msg}"
    );
    assert!(
        msg.contains(&format!("{expected} tokens"))
            && msg.contains("513")
            && msg.contains("tiny.parquet"),
        "{msg}"
    );
}

#[test]
fn stream_is_rows_in_order_with_bos_and_eos_and_stops_at_target() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rows.parquet");
    // More rows than one parallel batch, so the order across batches is exercised.
    let rows = calibration::stream::BATCH_ROWS * 2 + 17;
    write_open_instruct(&path, &open_instruct_cols(rows));
    let tok = RowTokenizer::from_file(&tokenizer()).unwrap();
    let template = "{task_name}: {alpaca_prompt} => {response} ({source})";
    let per_row: Vec<Vec<u32>> = (0..rows)
        .map(|r| {
            tok.encode_row(&format!(
                "task_name {r}: alpaca_prompt {r} => response {r} (source {r})"
            ))
            .unwrap()
        })
        .collect();
    assert!(per_row.iter().all(|ids| ids[0] == 1
        && ids[ids.len() - 1] == 2
        && ids[1..ids.len() - 1].iter().all(|&i| i > 2)));

    // Target 4 * 3 * 100 = 1200 tokens: the stream is the shortest prefix of rows reaching it.
    let recipe = small_recipe(template, 3, 100);
    let data = calibration::Dataset::open(&path).unwrap();
    let parsed = recipe.validate().unwrap();
    let stream = calibration::build_stream(&data, &tok, &parsed, recipe.target_tokens()).unwrap();
    let mut expected = Vec::new();
    let mut used = 0;
    while expected.len() < 1200 {
        expected.extend_from_slice(&per_row[used]);
        used += 1;
    }
    assert_eq!((stream.rows_read, stream.exhausted), (used, false));
    assert_eq!(stream.ids, expected);

    // Asking for more than the file holds reads every row.
    let all = calibration::build_stream(&data, &tok, &parsed, usize::MAX).unwrap();
    assert_eq!((all.rows_read, all.exhausted), (rows, true));
    assert_eq!(all.ids, per_row.concat());

    // The windows of the full build come from that stream at CPython's offsets.
    let set = build(&path, &tokenizer(), &recipe).unwrap();
    let starts = calibration::window_starts(expected.len(), 3, 100, 0).unwrap();
    for (i, start) in starts.into_iter().enumerate() {
        let window: Vec<u32> = set.window(i).iter().map(|&id| id as u32).collect();
        assert_eq!(window, expected[start..start + 100]);
    }
    assert_eq!(set.meta.template, template);
}

#[test]
fn unknown_placeholder_fails_before_reading() {
    let (err, msg) = build_err(
        Path::new("does-not-matter.parquet"),
        &small_recipe("{prompt}", 1, 2),
    );
    assert!(
        matches!(err, Error::UnknownPlaceholder { ref name, .. } if name == "prompt"),
        "{msg}"
    );
}
