//! One changelog column's Arrow builder, typed. A row's values reach their
//! builders through a match on [`ColumnBuilder`], not through
//! `dyn ArrayBuilder`: that cost a virtual call and a type check per value,
//! millions of times a second in a drain.

use std::any::Any;

use arrow::array::{
    ArrayBuilder, ArrayRef, BinaryBuilder, BooleanBuilder, Date32Builder, Decimal128Builder,
    Float32Builder, Float64Builder, Int8Builder, Int16Builder, Int32Builder, Int64Builder,
    ListBuilder, StringBuilder, TimestampMicrosecondBuilder, make_builder,
};
use arrow::datatypes::DataType;

use crate::decode::Datum;
use crate::decode::schema::ColumnType;

/// Rows a builder has room for before it grows.
const CAPACITY: usize = 1024;

/// The builder of one column, by the Arrow type its [`ColumnType`] is
/// written as.
pub enum ColumnBuilder {
    Bool(BooleanBuilder),
    Int8(Int8Builder),
    Int16(Int16Builder),
    Int32(Int32Builder),
    /// `bigint`, and `time` as microseconds.
    Int64(Int64Builder),
    Float32(Float32Builder),
    Float64(Float64Builder),
    /// Text, JSON, and the decimals kept as text.
    Utf8(StringBuilder),
    Binary(BinaryBuilder),
    /// Decimals that fit 38 digits, and `numeric` with its NaN and
    /// infinities in a text sibling.
    Decimal(Decimal128Builder),
    Date(Date32Builder),
    Timestamp(TimestampMicrosecondBuilder),
    List(Box<ListBuilder<ColumnBuilder>>),
}

impl ColumnBuilder {
    pub fn new(ty: &ColumnType) -> ColumnBuilder {
        let data_type = ty.arrow();
        if let (ColumnType::List(item), DataType::List(field)) = (ty, &data_type) {
            let values = ColumnBuilder::new(item);
            return ColumnBuilder::List(Box::new(
                ListBuilder::with_capacity(values, CAPACITY).with_field(field.clone()),
            ));
        }
        // Made as arrow makes them for the type (its precision and scale,
        // its time zone), then taken as the concrete builder.
        let any = make_builder(&data_type, CAPACITY).into_box_any();
        fn take<T: 'static>(any: Box<dyn Any>) -> T {
            *any.downcast::<T>()
                .expect("arrow's builder for the column's type")
        }
        match ty {
            ColumnType::Bool => ColumnBuilder::Bool(take(any)),
            ColumnType::Int8 => ColumnBuilder::Int8(take(any)),
            ColumnType::Int16 => ColumnBuilder::Int16(take(any)),
            ColumnType::Int32 => ColumnBuilder::Int32(take(any)),
            ColumnType::Int64 | ColumnType::Time(_) => ColumnBuilder::Int64(take(any)),
            ColumnType::Float32 => ColumnBuilder::Float32(take(any)),
            ColumnType::Float64 => ColumnBuilder::Float64(take(any)),
            ColumnType::Utf8
            | ColumnType::Json
            | ColumnType::VariableDecimal
            | ColumnType::WideDecimal { .. } => ColumnBuilder::Utf8(take(any)),
            ColumnType::Binary => ColumnBuilder::Binary(take(any)),
            ColumnType::Decimal { .. } | ColumnType::NumericText { .. } => {
                ColumnBuilder::Decimal(take(any))
            }
            ColumnType::Date => ColumnBuilder::Date(take(any)),
            ColumnType::LocalTimestamp(_) | ColumnType::ZonedTimestamp => {
                ColumnBuilder::Timestamp(take(any))
            }
            ColumnType::List(_) => unreachable!("a list's type is an Arrow list"),
        }
    }

    /// Appends one value. The decoder has checked it against the column's
    /// type, so a value of another kind can only be a null.
    pub fn append(&mut self, value: &Datum) {
        match (self, value) {
            (ColumnBuilder::Bool(b), Datum::Bool(v)) => b.append_value(*v),
            (ColumnBuilder::Bool(b), _) => b.append_null(),
            (ColumnBuilder::Int8(b), Datum::Int(v)) => b.append_value(*v as i8),
            (ColumnBuilder::Int8(b), _) => b.append_null(),
            (ColumnBuilder::Int16(b), Datum::Int(v)) => b.append_value(*v as i16),
            (ColumnBuilder::Int16(b), _) => b.append_null(),
            (ColumnBuilder::Int32(b), Datum::Int(v)) => b.append_value(*v as i32),
            (ColumnBuilder::Int32(b), _) => b.append_null(),
            (ColumnBuilder::Int64(b), Datum::Int(v)) => b.append_value(*v),
            (ColumnBuilder::Int64(b), _) => b.append_null(),
            (ColumnBuilder::Float32(b), Datum::Float(v)) => b.append_value(*v as f32),
            (ColumnBuilder::Float32(b), _) => b.append_null(),
            (ColumnBuilder::Float64(b), Datum::Float(v)) => b.append_value(*v),
            (ColumnBuilder::Float64(b), _) => b.append_null(),
            (ColumnBuilder::Utf8(b), Datum::Str(s)) => b.append_value(s),
            (ColumnBuilder::Utf8(b), _) => b.append_null(),
            (ColumnBuilder::Binary(b), Datum::Bytes(v)) => b.append_value(v),
            (ColumnBuilder::Binary(b), _) => b.append_null(),
            (ColumnBuilder::Decimal(b), Datum::Decimal(v)) => b.append_value(*v),
            (ColumnBuilder::Decimal(b), _) => b.append_null(),
            (ColumnBuilder::Date(b), Datum::Int(v)) => b.append_value(*v as i32),
            (ColumnBuilder::Date(b), _) => b.append_null(),
            (ColumnBuilder::Timestamp(b), Datum::Int(v)) => b.append_value(*v),
            (ColumnBuilder::Timestamp(b), _) => b.append_null(),
            (ColumnBuilder::List(b), Datum::List(items)) => {
                for item in items {
                    b.values().append(item);
                }
                b.append(true);
            }
            (ColumnBuilder::List(b), _) => b.append(false),
        }
    }

    fn inner(&self) -> &dyn ArrayBuilder {
        match self {
            ColumnBuilder::Bool(b) => b,
            ColumnBuilder::Int8(b) => b,
            ColumnBuilder::Int16(b) => b,
            ColumnBuilder::Int32(b) => b,
            ColumnBuilder::Int64(b) => b,
            ColumnBuilder::Float32(b) => b,
            ColumnBuilder::Float64(b) => b,
            ColumnBuilder::Utf8(b) => b,
            ColumnBuilder::Binary(b) => b,
            ColumnBuilder::Decimal(b) => b,
            ColumnBuilder::Date(b) => b,
            ColumnBuilder::Timestamp(b) => b,
            ColumnBuilder::List(b) => b.as_ref(),
        }
    }

    fn inner_mut(&mut self) -> &mut dyn ArrayBuilder {
        match self {
            ColumnBuilder::Bool(b) => b,
            ColumnBuilder::Int8(b) => b,
            ColumnBuilder::Int16(b) => b,
            ColumnBuilder::Int32(b) => b,
            ColumnBuilder::Int64(b) => b,
            ColumnBuilder::Float32(b) => b,
            ColumnBuilder::Float64(b) => b,
            ColumnBuilder::Utf8(b) => b,
            ColumnBuilder::Binary(b) => b,
            ColumnBuilder::Decimal(b) => b,
            ColumnBuilder::Date(b) => b,
            ColumnBuilder::Timestamp(b) => b,
            ColumnBuilder::List(b) => b.as_mut(),
        }
    }
}

/// So that a list's items are a [`ColumnBuilder`] too.
impl ArrayBuilder for ColumnBuilder {
    fn len(&self) -> usize {
        self.inner().len()
    }

    fn finish(&mut self) -> ArrayRef {
        self.inner_mut().finish()
    }

    fn finish_cloned(&self) -> ArrayRef {
        self.inner().finish_cloned()
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }

    fn into_box_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{Int32Type, TimestampMicrosecondType};

    use super::*;

    /// Each builder makes the column type's Arrow type, nested lists
    /// included, and a value of another kind is a null.
    #[test]
    fn builders_make_their_columns_arrow_type() {
        let types = [
            ColumnType::Bool,
            ColumnType::Int16,
            ColumnType::Decimal {
                precision: 10,
                scale: 2,
            },
            ColumnType::ZonedTimestamp,
            ColumnType::List(Box::new(ColumnType::Int32)),
            ColumnType::List(Box::new(ColumnType::List(Box::new(ColumnType::Utf8)))),
        ];
        for ty in &types {
            let mut b = ColumnBuilder::new(ty);
            b.append(&Datum::Null);
            let array = b.finish();
            assert_eq!(array.data_type(), &ty.arrow(), "{ty:?}");
            assert_eq!((array.len(), array.null_count()), (1, 1), "{ty:?}");
        }
        let mut ints = ColumnBuilder::new(&ColumnType::List(Box::new(ColumnType::Int32)));
        ints.append(&Datum::List(vec![Datum::Int(7), Datum::Null]));
        let array = ints.finish();
        let items = array.as_list::<i32>().value(0);
        let items = items.as_primitive::<Int32Type>();
        assert_eq!((items.value(0), items.is_null(1)), (7, true));
        let mut at = ColumnBuilder::new(&ColumnType::ZonedTimestamp);
        at.append(&Datum::Int(1_700_000_000_000_000));
        let array = at.finish();
        assert_eq!(
            array.as_primitive::<TimestampMicrosecondType>().value(0),
            1_700_000_000_000_000
        );
    }
}
