/*
 * Carries values that Debezium 3.4's own converters lose as PostgreSQL's
 * exact text, so that the sink can land them exactly:
 *
 *  - numeric (and domains over it), scalar: Debezium's `precise` mode has no
 *    encoding for NaN and +-Infinity and sends null; `string` mode spells them
 *    NAN / POSITIVE_INFINITY and drops the precision and scale. Here a
 *    numeric is the decimal text ("12.500", "NaN", "Infinity", "-Infinity")
 *    in a string schema named `cdclake.Numeric` whose parameters keep the
 *    declared precision and scale (none for an unconstrained numeric).
 *  - numeric[]: the JDBC driver cannot parse NaN into a BigDecimal, so
 *    Debezium sends the whole array as null in every mode. Here it is an
 *    array of `cdclake.Numeric` texts, read from PostgreSQL's array text.
 *  - bit(n) for n > 1, and bit varying: Debezium's `Bits` bytes drop leading
 *    zeros ('1011' and '00001011' give the same byte). Here it is the bit
 *    string itself ("00001011"), named `cdclake.Bits`, declared length kept.
 *
 * Every schema here is optional: a delete under REPLICA IDENTITY DEFAULT
 * carries only the key, and a required schema would make Connect fail the
 * task on the NULL of any other column. A NOT NULL column says so in the
 * parameter `not_null`, which the sink reads as Connect's `optional`.
 *
 * An unchanged TOASTed value reaches a converter as Debezium's marker, a
 * bare java.lang.Object (only Debezium's own converters spell it); it is
 * sent as Debezium's placeholder text, so the sink lists the column as
 * unchanged instead of writing a value.
 *
 * Everything else is left to Debezium. bit(1) stays a boolean, as Debezium
 * sends it. timetz cannot be helped here: while streaming, Debezium hands
 * converters an OffsetTime already moved to UTC.
 *
 * Built by tests/stack.sh and nix/packages.nix with javac against the
 * connector's own debezium-api and debezium-core jars and Kafka's
 * connect-api; registered in debezium/twitter-postgres.json (`converters`).
 */
package io.cdclake.debezium;

import java.math.BigDecimal;
import java.sql.Types;
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;

import io.debezium.data.SpecialValueDecimal;
import io.debezium.spi.converter.CustomConverter;
import io.debezium.spi.converter.RelationalColumn;
import org.apache.kafka.connect.data.SchemaBuilder;

public class ExactValueConverter implements CustomConverter<SchemaBuilder, RelationalColumn> {
    public static final String NUMERIC = "cdclake.Numeric";
    public static final String BITS = "cdclake.Bits";
    /** Debezium's stand-in for an unchanged TOASTed value. */
    private static final String UNAVAILABLE = "__debezium_unavailable_value";
    /** Declared lengths above this are PostgreSQL's "no typmod" markers. */
    private static final int MAX_NUMERIC_PRECISION = 1000;

    @Override
    public void configure(Properties props) {}

    @Override
    public void converterFor(RelationalColumn column, ConverterRegistration<SchemaBuilder> registration) {
        String type = column.typeName().toLowerCase();
        int jdbc = column.jdbcType();
        if (jdbc == Types.NUMERIC || jdbc == Types.DECIMAL) {
            registration.register(column(numericSchema(column), column), ExactValueConverter::numericText);
        } else if (type.equals("_numeric") || type.equals("_decimal")) {
            SchemaBuilder schema = SchemaBuilder.array(numericSchema(column).optional().build());
            registration.register(column(schema, column), ExactValueConverter::numericArray);
        } else if (type.equals("varbit") || type.equals("bit varying")
                || (type.equals("bit") && column.length().orElse(1) > 1)) {
            SchemaBuilder schema = SchemaBuilder.string().name(BITS);
            column.length().ifPresent(n -> schema.parameter("length", Integer.toString(n)));
            schema.parameter("varying", Boolean.toString(!type.equals("bit")));
            registration.register(column(schema, column), ExactValueConverter::bitText);
        }
    }

    /** The column's schema: optional, its NOT NULL as a parameter. */
    private static SchemaBuilder column(SchemaBuilder schema, RelationalColumn column) {
        if (!column.isOptional()) {
            schema.parameter("not_null", "true");
        }
        return schema.optional();
    }

    private static SchemaBuilder numericSchema(RelationalColumn column) {
        SchemaBuilder schema = SchemaBuilder.string().name(NUMERIC);
        int precision = column.length().orElse(0);
        // An unconstrained numeric reports 0 (snapshot) or 131089 (streaming).
        if (precision > 0 && precision <= MAX_NUMERIC_PRECISION) {
            schema.parameter("precision", Integer.toString(precision));
            schema.parameter("scale", Integer.toString(column.scale().orElse(0)));
        }
        return schema;
    }

    /** Debezium's marker object for an unchanged TOASTed value. */
    private static boolean unchangedToast(Object v) {
        return v.getClass() == Object.class;
    }

    /**
     * A bit string as PostgreSQL spells it: text while streaming, a PGobject
     * in a snapshot. A column default arrives already as Debezium's bytes,
     * which no longer know their leading zeros: no default then.
     */
    static Object bitText(Object v) {
        if (v == null || v instanceof byte[]) {
            return null;
        }
        return unchangedToast(v) ? UNAVAILABLE : v.toString();
    }

    /** PostgreSQL's own spelling of one numeric value. */
    static Object numericText(Object v) {
        if (v == null) {
            return null;
        }
        if (unchangedToast(v)) {
            return UNAVAILABLE;
        }
        if (v instanceof SpecialValueDecimal) {
            SpecialValueDecimal d = (SpecialValueDecimal) v;
            if (d.getDecimalValue().isPresent()) {
                return d.getDecimalValue().get().toPlainString();
            }
            if (d.equals(SpecialValueDecimal.NOT_A_NUMBER)) {
                return "NaN";
            }
            return d.equals(SpecialValueDecimal.POSITIVE_INF) ? "Infinity" : "-Infinity";
        }
        if (v instanceof BigDecimal) {
            return ((BigDecimal) v).toPlainString();
        }
        // The unchanged-TOAST stand-in and default values spelled as text.
        return v.toString();
    }

    /**
     * An array from PostgreSQL's text form (the driver's PgArray prints it):
     * numerics are never quoted, so elements split on commas. Bounds other
     * than the default (`[0:2]={1,2,3}`) are dropped, and the braces of a
     * multi-dimensional array are flattened: the elements in order, as
     * Debezium's own array schema has one dimension.
     */
    static Object numericArray(Object v) {
        if (v == null) {
            return null;
        }
        if (unchangedToast(v)) {
            return List.of(UNAVAILABLE);
        }
        if (v instanceof List) {
            List<Object> out = new ArrayList<>();
            for (Object item : (List<?>) v) {
                out.add(numericText(item));
            }
            return out;
        }
        String text = v.toString();
        if (text.equals(UNAVAILABLE)) {
            // Debezium's own form of the stand-in for an array column.
            return List.of(UNAVAILABLE);
        }
        List<Object> out = new ArrayList<>();
        int braces = text.indexOf('{');
        String inner = text.substring(Math.max(braces, 0)).replace("{", "").replace("}", "").trim();
        if (inner.isEmpty()) {
            return out;
        }
        for (String item : inner.split(",")) {
            String s = item.trim();
            out.add(s.equals("NULL") ? null : s);
        }
        return out;
    }
}
