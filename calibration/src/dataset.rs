//! Reading VMware/open-instruct rows from parquet, in file order, with the parquet crate's row API.
//!
//! The schema is five UTF-8 string columns ([`COLUMNS`]); a file missing one, or holding one with
//! another type, is rejected when it is opened, before any row is read.

use std::fs::File;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parquet::basic::{ConvertedType, LogicalType, Type as PhysicalType};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::reader::RowIter;
use parquet::record::Field;
use parquet::schema::types::Type;

use crate::error::{Error, Result};
use crate::recipe::COLUMNS;

/// An opened Open Instruct parquet file whose schema has been checked.
pub struct Dataset {
    path: PathBuf,
    reader: SerializedFileReader<File>,
    num_rows: usize,
}

impl std::fmt::Debug for Dataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataset")
            .field("path", &self.path)
            .field("num_rows", &self.num_rows)
            .finish()
    }
}

impl Dataset {
    /// Opens `path` and checks that it is parquet with the five string columns and at least one row.
    ///
    /// # Errors
    /// [`Error::Io`] if it cannot be opened, [`Error::EmptyDataset`] for a 0-byte file or one with no
    /// rows, [`Error::NotParquet`], [`Error::MissingColumn`], [`Error::NotStringColumn`].
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(Error::io(path))?;
        let len = file.metadata().map_err(Error::io(path))?.len();
        if len == 0 {
            return Err(Error::EmptyDataset {
                path: path.to_path_buf(),
                what: "the file is empty (0 bytes)",
            });
        }
        let reader = SerializedFileReader::new(file).map_err(|e| Error::NotParquet {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        check_schema(path, reader.metadata().file_metadata().schema())?;
        let num_rows = usize::try_from(reader.metadata().file_metadata().num_rows()).unwrap_or(0);
        if num_rows == 0 {
            return Err(Error::EmptyDataset {
                path: path.to_path_buf(),
                what: "the parquet file has no rows",
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            reader,
            num_rows,
        })
    }

    /// The file this dataset was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Rows in the file (from its footer).
    pub fn num_rows(&self) -> usize {
        self.num_rows
    }

    /// Reads rows in file order, calling `visit(row_index, values)` for each until it breaks.
    ///
    /// Only the columns in `columns` (indices into [`COLUMNS`]) are decoded; `values[c]` holds
    /// column `COLUMNS[c]` for those and is empty for the others.
    ///
    /// # Errors
    /// [`Error::NullValue`] for a null in a requested column, [`Error::ReadRow`] if decoding fails,
    /// and any error `visit` returns.
    pub fn read_rows(
        &self,
        columns: &[usize],
        mut visit: impl FnMut(usize, Vec<String>) -> Result<ControlFlow<()>>,
    ) -> Result<()> {
        let projection = self.projection(columns);
        let mut row_index = 0usize;
        for group in 0..self.reader.num_row_groups() {
            let read_err = |row: usize, e: parquet::errors::ParquetError| Error::ReadRow {
                path: self.path.clone(),
                row,
                reason: e.to_string(),
            };
            let group_reader = self
                .reader
                .get_row_group(group)
                .map_err(|e| read_err(row_index, e))?;
            let rows = RowIter::from_row_group(Some(projection.clone()), &*group_reader)
                .map_err(|e| read_err(row_index, e))?;
            for row in rows {
                let row = row.map_err(|e| read_err(row_index, e))?;
                let mut values = vec![String::new(); COLUMNS.len()];
                for (name, field) in row.into_columns() {
                    let Some(c) = COLUMNS.iter().position(|&col| col == name) else {
                        continue;
                    };
                    values[c] = match field {
                        Field::Str(s) => s,
                        Field::Null => {
                            return Err(Error::NullValue {
                                path: self.path.clone(),
                                row: row_index,
                                column: name,
                            })
                        }
                        other => {
                            return Err(Error::NotStringColumn {
                                path: self.path.clone(),
                                column: name,
                                got: format!("a value {other:?}"),
                            })
                        }
                    };
                }
                if visit(row_index, values)?.is_break() {
                    return Ok(());
                }
                row_index += 1;
            }
        }
        Ok(())
    }

    /// The file schema cut down to the requested columns, in file order.
    fn projection(&self, columns: &[usize]) -> Type {
        let root = self.reader.metadata().file_metadata().schema();
        let fields: Vec<Arc<Type>> = root
            .get_fields()
            .iter()
            .filter(|f| columns.iter().any(|&c| COLUMNS[c] == f.name()))
            .cloned()
            .collect();
        // The root is a group (checked in `open`), so rebuilding it with a subset of its fields
        // cannot fail; fall back to the whole schema rather than panic.
        Type::group_type_builder(root.name())
            .with_fields(fields)
            .build()
            .unwrap_or_else(|_| root.clone())
    }
}

/// Checks that each of [`COLUMNS`] is a top-level UTF-8 string column.
fn check_schema(path: &Path, root: &Type) -> Result<()> {
    let found: Vec<String> = if root.is_group() {
        root.get_fields()
            .iter()
            .map(|f| f.name().to_string())
            .collect()
    } else {
        Vec::new()
    };
    for column in COLUMNS {
        let field = root
            .is_group()
            .then(|| root.get_fields().iter().find(|f| f.name() == column))
            .flatten()
            .ok_or_else(|| Error::MissingColumn {
                path: path.to_path_buf(),
                column: column.to_string(),
                found: found.clone(),
            })?;
        if !is_string(field) {
            return Err(Error::NotStringColumn {
                path: path.to_path_buf(),
                column: column.to_string(),
                got: describe(field),
            });
        }
    }
    Ok(())
}

fn is_string(field: &Type) -> bool {
    if !field.is_primitive() || field.get_physical_type() != PhysicalType::BYTE_ARRAY {
        return false;
    }
    let info = field.get_basic_info();
    matches!(info.logical_type_ref(), Some(LogicalType::String))
        || info.converted_type() == ConvertedType::UTF8
}

fn describe(field: &Type) -> String {
    if !field.is_primitive() {
        return "a group (nested column)".to_string();
    }
    let info = field.get_basic_info();
    match info.logical_type_ref() {
        Some(logical) => format!("{} ({logical:?})", field.get_physical_type()),
        None => format!("{} ({})", field.get_physical_type(), info.converted_type()),
    }
}
