/*
 * A Kafka Connect value converter that writes Connect's JSON without the
 * schema in every message, and stays self-describing: each distinct schema
 * is published once, keyed by its fingerprint, to a compacted topic, and
 * every message names its schema (in a header, or in the Avro value's frame).
 *
 *  - value: exactly what JsonConverter writes with schemas.enable=false
 *    (the Debezium envelope's payload: before, after, source, op, ...);
 *  - header `cdclake.schema`: the fingerprint, 32 hex digits of the SHA-256
 *    of the schema's JSON (what JsonConverter would have put under
 *    `schema`);
 *  - topic `schema.topic` (default `_cdclake.schemas`, compacted, created
 *    here if missing): key = fingerprint, value = the schema's JSON.
 *
 * A schema is written, and acknowledged by the broker, before the first
 * message that names it is handed to Connect's producer, so a reader that
 * meets an unknown fingerprint finds it by reading the schema topic to its
 * end. A tombstone (null value) stays a null value with no header.
 *
 * Why not a schema registry: none runs from the registries this project
 * builds from, and the sink needs nothing but the schema's JSON, which it
 * already parses (docs/design.md, "Message format").
 *
 * Configuration, under `value.converter.` in the connector config: every
 * JsonConverter key (passed on, schemas.enable forced off), plus
 * `schema.topic` and `schema.bootstrap.servers` (required), and `format`:
 * `json` (the default, as above) or `avro`, the payload in Avro's binary
 * encoding instead (AvroBinary: its Avro schema follows from the same
 * Connect schema), framed: 0xCD, 1, flags (1 when the record has Kafka
 * headers), the fingerprint's 32 hex digits, then the Avro body, with no
 * header added (crates/cdc-wire, `Frame`, says why). A value the rules do
 * not cover (a schema with a map in it, or a value its schema does not
 * describe) is written as JSON, with the `cdclake.schema` header. The sink
 * still reads the Avro values of earlier versions: unframed, with the
 * headers `cdclake.schema` and `cdclake.encoding: avro`.
 */
package io.cdclake.debezium;

import java.nio.charset.StandardCharsets;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.util.HashMap;
import java.util.IdentityHashMap;
import java.util.List;
import java.util.Map;
import java.util.Optional;
import java.util.Properties;
import java.util.concurrent.ExecutionException;

import com.fasterxml.jackson.databind.ObjectMapper;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.NewTopic;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.errors.TopicExistsException;
import org.apache.kafka.common.header.Headers;
import org.apache.kafka.common.serialization.ByteArraySerializer;
import org.apache.kafka.connect.data.Schema;
import org.apache.kafka.connect.data.SchemaAndValue;
import org.apache.kafka.connect.errors.DataException;
import org.apache.kafka.connect.json.JsonConverter;
import org.apache.kafka.connect.storage.Converter;

public class SchemaIdConverter implements Converter {
    public static final String HEADER = "cdclake.schema";
    public static final String DEFAULT_TOPIC = "_cdclake.schemas";

    private final JsonConverter payloads = new JsonConverter();
    private final JsonConverter schemas = new JsonConverter();
    private final ObjectMapper mapper = new ObjectMapper();
    /** Debezium keeps one Schema object per table version: identity is enough, and cheap. */
    private final Map<Schema, byte[]> fingerprints = new IdentityHashMap<>();
    private KafkaProducer<byte[], byte[]> producer;
    private String topic;
    /** Set when `format` is `avro`. */
    private AvroBinary avro;
    /** Whether the Avro rules cover a schema (no map in it); its values go as JSON if not. */
    private final Map<Schema, Boolean> avroable = new IdentityHashMap<>();

    @Override
    public void configure(Map<String, ?> configs, boolean isKey) {
        Map<String, Object> json = new HashMap<>(configs);
        json.remove("schema.topic");
        json.remove("schema.bootstrap.servers");
        Object format = json.remove("format");
        if (format != null && format.toString().equals("avro")) {
            if (isKey) {
                throw new DataException("SchemaIdConverter: `format` avro is for values; keys stay JSON");
            }
            Object replace = json.get("replace.null.with.default");
            avro = new AvroBinary(replace == null || Boolean.parseBoolean(replace.toString()));
        } else if (format != null && !format.toString().equals("json")) {
            throw new DataException("SchemaIdConverter: `format` is `json` or `avro`, not `" + format + "`");
        }
        json.put("schemas.enable", "false");
        payloads.configure(json, isKey);
        Map<String, Object> withSchemas = new HashMap<>(json);
        withSchemas.put("schemas.enable", "true");
        schemas.configure(withSchemas, isKey);

        Object servers = configs.get("schema.bootstrap.servers");
        if (servers == null || servers.toString().isBlank()) {
            throw new DataException("SchemaIdConverter: `schema.bootstrap.servers` is not set");
        }
        Object t = configs.get("schema.topic");
        topic = t == null || t.toString().isBlank() ? DEFAULT_TOPIC : t.toString();
        Properties admin = new Properties();
        admin.put("bootstrap.servers", servers.toString());
        try (Admin a = Admin.create(admin)) {
            NewTopic nt = new NewTopic(topic, Optional.of(1), Optional.empty())
                    .configs(Map.of("cleanup.policy", "compact"));
            a.createTopics(List.of(nt)).all().get();
        } catch (ExecutionException e) {
            if (!(e.getCause() instanceof TopicExistsException)) {
                throw new DataException("SchemaIdConverter: creating topic " + topic + " failed", e.getCause());
            }
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            throw new DataException("SchemaIdConverter: interrupted creating topic " + topic, e);
        }
        Properties p = new Properties();
        p.put("bootstrap.servers", servers.toString());
        p.put("acks", "all");
        p.put("enable.idempotence", "true");
        p.put("client.id", "cdclake-schemas-" + (isKey ? "key" : "value") + "-" + System.identityHashCode(this));
        producer = new KafkaProducer<>(p, new ByteArraySerializer(), new ByteArraySerializer());
    }

    @Override
    public byte[] fromConnectData(String topic, Schema schema, Object value) {
        throw new DataException("SchemaIdConverter needs the record's headers (Kafka Connect 2.4 or later)");
    }

    @Override
    public byte[] fromConnectData(String topic, Headers headers, Schema schema, Object value) {
        if (value == null) {
            return null;
        }
        byte[] id = fingerprints.get(schema);
        if (id == null) {
            id = publish(schema);
            fingerprints.put(schema, id);
        }
        if (avro != null && avroable.computeIfAbsent(schema, AvroBinary::covers)) {
            try {
                // The headers Connect converted before this value (Debezium's
                // key-update headers, say): the frame tells the sink whether
                // to read any, which costs it an allocation per message.
                return avro.framed(schema, value, id, headers.iterator().hasNext());
            } catch (ClassCastException | DataException e) {
                // A value its schema does not describe (none is known from
                // Debezium; the buffer is reset at the next encode). JSON
                // carries anything, and the sink reads that message as JSON.
            }
        }
        headers.add(HEADER, id);
        return payloads.fromConnectData(topic, schema, value);
    }

    /** Writes the schema's JSON to the schema topic, waits for the broker, returns its fingerprint. */
    private byte[] publish(Schema schema) {
        try {
            byte[] json = mapper.writeValueAsBytes(schemas.asJsonSchema(schema));
            byte[] digest = MessageDigest.getInstance("SHA-256").digest(json);
            StringBuilder hex = new StringBuilder(32);
            for (int i = 0; i < 16; i++) {
                hex.append(String.format("%02x", digest[i]));
            }
            byte[] id = hex.toString().getBytes(StandardCharsets.US_ASCII);
            producer.send(new ProducerRecord<>(topic, id, json)).get();
            return id;
        } catch (ExecutionException e) {
            throw new DataException("SchemaIdConverter: publishing a schema to " + topic + " failed", e.getCause());
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            throw new DataException("SchemaIdConverter: interrupted publishing a schema", e);
        } catch (NoSuchAlgorithmException | com.fasterxml.jackson.core.JsonProcessingException e) {
            throw new DataException("SchemaIdConverter: " + e.getMessage(), e);
        }
    }

    @Override
    public SchemaAndValue toConnectData(String topic, byte[] value) {
        throw new DataException("SchemaIdConverter writes only; read with the schema topic and the header");
    }

    /** This one owns a producer. */
    @Override
    public void close() {
        if (producer != null) {
            producer.close();
        }
    }
}
