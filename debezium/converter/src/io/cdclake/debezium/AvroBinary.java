/*
 * Writes a Kafka Connect value in Avro's binary encoding, under the Avro
 * schema that follows from its Connect schema by these rules (no Avro
 * library needed, on either side):
 *
 *  - struct -> record of its fields, in order; array -> array (a schema
 *    with a map in it is not covered: its values stay JSON);
 *  - int8, int16, int32 -> int; int64 -> long (zig-zag varints);
 *    float32 -> float; float64 -> double; boolean -> boolean;
 *    string -> string; bytes -> bytes;
 *  - an optional schema -> the union ["null", T] (index 0 is null);
 *  - Connect's logical types as the primitive they are stored as: Decimal
 *    as the unscaled big-endian two's complement bytes (what JsonConverter
 *    base64-encodes), Date as int days, Time as int milliseconds,
 *    Timestamp as long milliseconds.
 *
 * The sink decodes it by walking the same Connect schema, which the
 * schema topic already carries, so the value holds nothing but the data:
 * no field names, no quotes, no digits in text.
 */
package io.cdclake.debezium;

import java.io.ByteArrayOutputStream;
import java.math.BigDecimal;
import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.util.List;

import org.apache.kafka.connect.data.Date;
import org.apache.kafka.connect.data.Decimal;
import org.apache.kafka.connect.data.Field;
import org.apache.kafka.connect.data.Schema;
import org.apache.kafka.connect.data.Struct;
import org.apache.kafka.connect.data.Time;
import org.apache.kafka.connect.data.Timestamp;
import org.apache.kafka.connect.errors.DataException;

final class AvroBinary {
    private static final String VARIABLE_SCALE_DECIMAL = "io.debezium.data.VariableScaleDecimal";
    private final ByteArrayOutputStream out = new ByteArrayOutputStream(1024);
    /** JsonConverter's `replace.null.with.default`: a null with a default is written as the default. */
    private final boolean nullAsDefault;

    AvroBinary(boolean nullAsDefault) {
        this.nullAsDefault = nullAsDefault;
    }

    /**
     * Whether these rules, and the sink's reader of them, cover an envelope
     * schema: no map anywhere, and as a column no struct but Debezium's
     * VariableScaleDecimal (a `point` or a geometry is a struct: the sink
     * keeps those as JSON text, which it cannot make without field names).
     */
    static boolean covers(Schema envelope) {
        if (envelope.type() != Schema.Type.STRUCT) {
            return false;
        }
        for (Field f : envelope.fields()) {
            boolean ok = switch (f.name()) {
                case "before", "after" -> f.schema().type() == Schema.Type.STRUCT
                        && f.schema().fields().stream().allMatch(c -> column(c.schema()));
                default -> noMap(f.schema());
            };
            if (!ok) {
                return false;
            }
        }
        return true;
    }

    private static boolean column(Schema s) {
        return switch (s.type()) {
            case MAP -> false;
            case STRUCT -> VARIABLE_SCALE_DECIMAL.equals(s.name());
            case ARRAY -> column(s.valueSchema());
            default -> true;
        };
    }

    private static boolean noMap(Schema s) {
        return switch (s.type()) {
            case MAP -> false;
            case ARRAY -> noMap(s.valueSchema());
            case STRUCT -> s.fields().stream().allMatch(f -> noMap(f.schema()));
            default -> true;
        };
    }

    /** The value's encoding. Not thread-safe: one per converter, and Connect calls a converter from one thread. */
    /**
     * The value framed as the sink reads it (crates/cdc-wire, `Frame`):
     * magic 0xCD, version 1, flags (1: the record has Kafka headers), the
     * fingerprint's 32 hex digits, then the Avro body. Written in one
     * buffer, so the frame costs no copy.
     */
    byte[] framed(Schema schema, Object value, byte[] fingerprint, boolean hasHeaders) {
        if (fingerprint.length != 32) {
            throw new IllegalStateException("a frame's fingerprint is 32 hex digits, not " + fingerprint.length + " bytes");
        }
        out.reset();
        out.write(0xCD);
        out.write(1);
        out.write(hasHeaders ? 1 : 0);
        out.write(fingerprint, 0, fingerprint.length);
        write(schema, value);
        return out.toByteArray();
    }

    private void write(Schema schema, Object value) {
        if (schema.isOptional()) {
            if (value == null) {
                varint(0);
                return;
            }
            varint(2); // zig-zag of union index 1
        } else if (value == null) {
            throw new DataException("a null value for a required " + schema.type() + " field");
        }
        String name = schema.name();
        if (name != null) {
            switch (name) {
                case Decimal.LOGICAL_NAME -> {
                    bytes(Decimal.fromLogical(schema, (BigDecimal) value));
                    return;
                }
                case Date.LOGICAL_NAME -> {
                    varint(zigzag(Date.fromLogical(schema, (java.util.Date) value)));
                    return;
                }
                case Time.LOGICAL_NAME -> {
                    varint(zigzag(Time.fromLogical(schema, (java.util.Date) value)));
                    return;
                }
                case Timestamp.LOGICAL_NAME -> {
                    varint(zigzag(Timestamp.fromLogical(schema, (java.util.Date) value)));
                    return;
                }
                default -> { }
            }
        }
        switch (schema.type()) {
            case INT8, INT16, INT32, INT64 -> varint(zigzag(((Number) value).longValue()));
            case FLOAT32 -> {
                int bits = Float.floatToRawIntBits((Float) value);
                for (int i = 0; i < 4; i++) {
                    out.write(bits >>> (8 * i));
                }
            }
            case FLOAT64 -> {
                long bits = Double.doubleToRawLongBits((Double) value);
                for (int i = 0; i < 8; i++) {
                    out.write((int) (bits >>> (8 * i)));
                }
            }
            case BOOLEAN -> out.write(((Boolean) value) ? 1 : 0);
            case STRING -> bytes(((String) value).getBytes(StandardCharsets.UTF_8));
            case BYTES -> {
                if (value instanceof ByteBuffer b) {
                    byte[] copy = new byte[b.remaining()];
                    b.duplicate().get(copy);
                    bytes(copy);
                } else {
                    bytes((byte[]) value);
                }
            }
            case ARRAY -> {
                List<?> items = (List<?>) value;
                if (!items.isEmpty()) {
                    varint(zigzag(items.size()));
                    for (Object item : items) {
                        write(schema.valueSchema(), item);
                    }
                }
                varint(0);
            }
            case STRUCT -> {
                Struct struct = (Struct) value;
                for (Field f : schema.fields()) {
                    write(f.schema(), nullAsDefault ? struct.get(f) : struct.getWithoutDefault(f.name()));
                }
            }
            default -> throw new DataException("no Avro encoding for " + schema.type());
        }
    }

    private void bytes(byte[] b) {
        varint(zigzag(b.length));
        out.write(b, 0, b.length);
    }

    private static long zigzag(long n) {
        return (n << 1) ^ (n >> 63);
    }

    private void varint(long v) {
        while ((v & ~0x7FL) != 0) {
            out.write((int) ((v & 0x7F) | 0x80));
            v >>>= 7;
        }
        out.write((int) v);
    }
}
